"""Audio-reactive video nodes (menu: CharForge/Video): a clip whose motion follows a piece of music.

Load Audio (or ComfyUI's own Load Audio) -> Audio Prompt Travel (a prompt schedule with keyframes on the
beats, the frame count and fps for Generate Video) and Audio Schedule (any feature as one value per frame)
-> Generate Video -> Save Video with its ``audio`` input, which muxes the sound into the mp4 / webm in sync.

Audio travels as ComfyUI's own AUDIO value, ``{"waveform": (batch, channels, samples) float tensor,
"sample_rate": int}`` (comfy_extras/nodes_audio.py), so ComfyUI's audio nodes and these mix freely. The
analysis and the muxing are ``charforge.engine.video.audio`` / ``audio_features``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..deps import require
from .convert import input_files, resolve_input_file

CATEGORY = "CharForge/Video"
# Kept import-free (the engine module imports numpy at load); tests/nodes/test_video_audio.py checks them.
FEATURES = ("loudness", "onset", "beat", "low", "mid", "high")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".mp4", ".webm", ".mkv", ".mov")
NO_AUDIO = "(no audio files in the input folder)"


def audio_choices() -> list[str]:
    """Sound files in ComfyUI's input folder and its subfolders (as ``sub/name.wav``)."""
    return input_files(AUDIO_SUFFIXES, NO_AUDIO)


def resolve_audio(name: str) -> str:
    """The full path of an input-folder sound file named as `audio_choices` names it."""
    return resolve_input_file(
        name,
        NO_AUDIO,
        "audio",
        "no audio file chosen: put a sound file (wav, flac, mp3, m4a) into ComfyUI's input folder {root} "
        "and reload the page, then pick it (or upload one with ComfyUI's own Load Audio node)",
    )


def to_engine_audio(audio):
    """ComfyUI's AUDIO dict -> the engine's `Audio` (first item of the batch)."""
    from ..engine.video.audio import AudioError, from_waveform

    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise AudioError("audio must be ComfyUI's AUDIO value (waveform + sample_rate), e.g. from Load Audio")
    return from_waveform(audio["waveform"], int(audio["sample_rate"]))


def _timing_inputs():
    return {
        "fps": (
            "FLOAT",
            {
                "default": 8.0,
                "min": 1.0,
                "max": 60.0,
                "step": 0.5,
                "tooltip": "Frame rate of the clip: beats and features are placed on its frames.",
            },
        ),
        "frames": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 4096,
                "tooltip": "Frames of the clip; 0 = as many as the sound lasts at this fps.",
            },
        ),
    }


class LoadAudio:
    """Load a sound file (wav, flac, mp3, m4a, ...) from the input folder as ComfyUI's AUDIO value."""

    DESCRIPTION = (
        "Decodes a sound file from ComfyUI's input folder through PyAV (no system ffmpeg): wav, flac, mp3, m4a/aac, "
        "ogg/opus, or a video's sound track. start and duration cut the part the clip uses. The result is "
        "ComfyUI's own AUDIO value, so ComfyUI's audio nodes take it too (and these nodes take theirs)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AUDIO", "FLOAT", "STRING")
    RETURN_NAMES = ("audio", "seconds", "info")
    OUTPUT_TOOLTIPS = (
        "The sound: waveform (1, channels, samples) and sample rate.",
        "Its length in seconds (after start / duration).",
        "File, length, channels, sample rate and tempo.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = audio_choices()
        return {
            "required": {
                "audio": (
                    files,
                    {
                        "default": files[0],
                        # No "audio_upload": the editor draws its upload button and player only for ComfyUI's own
                        # audio nodes (it fails on others); ComfyUI's Load Audio has them and feeds these nodes.
                        "tooltip": (
                            "A sound file in ComfyUI's input folder (copy it there, or use ComfyUI's own Load Audio "
                            "node, which uploads, instead of this one)."
                        ),
                    },
                ),
                "start": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 36000.0,
                        "step": 0.01,
                        "tooltip": "Seconds into the file where the clip's sound begins.",
                    },
                ),
                "duration": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 36000.0,
                        "step": 0.01,
                        "tooltip": "Seconds to use from start; 0 = to the end of the file.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, audio, start=0.0, duration=0.0):
        # A new file under the same name must load again (ComfyUI caches by inputs otherwise).
        try:
            stat = os.stat(resolve_audio(audio))
        except (OSError, ValueError):
            return float("nan")
        return f"{stat.st_mtime_ns}-{stat.st_size}-{start}-{duration}"

    def load(self, audio, start=0.0, duration=0.0):
        torch = require("torch")
        require("av")
        from ..engine.video.audio import load_audio
        from ..engine.video.audio_features import analyse_audio

        path = resolve_audio(audio)
        sound = load_audio(path, float(start), float(duration) if duration > 0 else None)
        tempo = analyse_audio(sound, 10.0).tempo if sound.duration >= 1.0 else 0.0
        info = (
            f"{Path(path).name}: {sound.duration:.2f} s from {float(start):g} s, {sound.channels} channel(s) at "
            f"{sound.sample_rate} Hz" + (f", about {tempo:.0f} BPM" if tempo else "")
        )
        value = {"waveform": torch.from_numpy(sound.samples.copy())[None], "sample_rate": sound.sample_rate}
        return (value, float(sound.duration), info)


class AudioPromptTravel:
    """A prompt-travel schedule whose keyframes fall on the music's beats, for Generate Video."""

    DESCRIPTION = (
        "Finds the tempo and beats of the sound and writes a prompt schedule ('<frame>: <prompt>' lines) with a "
        "new prompt every N beats, cycling through the prompts given one per line; shared text is added to every "
        "keyframe. Connect prompt, frames and fps to Generate Video (turn blend_prompts off to switch exactly "
        "on the beat, on to glide between beats). Beat frames are round(beat time x fps)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "INT", "FLOAT", "STRING")
    RETURN_NAMES = ("prompt", "frames", "fps", "info")
    OUTPUT_TOOLTIPS = (
        "The prompt schedule for Generate Video's prompt input.",
        "The clip's frame count (for Generate Video's frames).",
        "The frame rate (for Generate Video's fps).",
        "Tempo, beats and the keyframes.",
    )
    FUNCTION = "schedule"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "The sound (Load Audio, CharForge's or ComfyUI's)."}),
                "prompts": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "ohwx woman dancing, arms up\nohwx woman spinning, hair flying\n"
                        "ohwx woman jumping, laughing",
                        "tooltip": "One prompt per line; the keyframes cycle through them.",
                    },
                ),
                "shared": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "photo, stage lights",
                        "tooltip": "Text added to every prompt (style, place, light).",
                    },
                ),
                **_timing_inputs(),
                "beats_per_prompt": (
                    "INT",
                    {
                        "default": 2,
                        "min": 1,
                        "max": 64,
                        "tooltip": "A new prompt every this many beats (4 = once a bar in 4/4).",
                    },
                ),
                "skip_beats": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 64,
                        "tooltip": "Beats to pass before the first change (to land changes on the bar's first beat).",
                    },
                ),
            },
        }

    def schedule(self, audio, prompts, shared, fps, frames, beats_per_prompt=2, skip_beats=0):
        from ..engine.video.audio_features import analyse_audio, beat_prompt_schedule

        features = analyse_audio(to_engine_audio(audio), float(fps), int(frames) or None)
        text = beat_prompt_schedule(
            features, str(prompts).splitlines(), int(beats_per_prompt), int(skip_beats), str(shared)
        )
        info = f"{features.describe()}\nprompt schedule:\n{text}"
        return (text, features.frames, float(fps), info)


class AudioSchedule:
    """One value per frame from the music (loudness, onsets, beats, bass / mid / treble), as a schedule."""

    DESCRIPTION = (
        "Turns a feature of the sound into one value per video frame between low and high: loudness (RMS, "
        "48 dB range), onset (spectral flux), beat (1 on beat frames), low / mid / high band energy. smooth "
        "averages over a window; attack and release set how fast the value rises and falls (a beat with "
        "release 0.3 s is a pulse that fades). Outputs the values as a FLOAT list (one per frame, for nodes "
        "that take lists), as '<frame>: <value>' text (the keyframed form schedule nodes read), and their "
        "average as one FLOAT."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING", "FLOAT", "INT", "STRING")
    RETURN_NAMES = ("values", "schedule", "average", "frames", "info")
    OUTPUT_IS_LIST = (True, False, False, False, False)
    OUTPUT_TOOLTIPS = (
        "One FLOAT per frame (a list: a node it feeds runs once per value).",
        "'<frame>: <value>' lines, one per frame.",
        "The values' average (for a strength input that takes one number).",
        "How many frames (values) there are.",
        "Feature, range and a summary of the values.",
    )
    FUNCTION = "schedule"

    @classmethod
    def INPUT_TYPES(cls):
        seconds = {"min": 0.0, "max": 10.0, "step": 0.01}
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "The sound (Load Audio, CharForge's or ComfyUI's)."}),
                "feature": (
                    list(FEATURES),
                    {
                        "default": "loudness",
                        "tooltip": (
                            "loudness: level; onset: new sounds (hits, notes); beat: 1 on the beat frames; low / mid / "
                            "high: energy below 200 Hz, 200-2000 Hz, above 2000 Hz."
                        ),
                    },
                ),
                **_timing_inputs(),
                "low": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "The value when the feature is 0.",
                    },
                ),
                "high": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "The value when the feature is 1.",
                    },
                ),
                "smooth": (
                    "FLOAT",
                    {"default": 0.0, **seconds, "tooltip": "Seconds averaged around each frame."},
                ),
                "attack": ("FLOAT", {"default": 0.0, **seconds, "tooltip": "Seconds to rise (0 = at once)."}),
                "release": (
                    "FLOAT",
                    {"default": 0.2, **seconds, "tooltip": "Seconds to fall (0 = at once)."},
                ),
                "invert": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Use 1 - feature: loud gives low."},
                ),
            },
        }

    def schedule(
        self, audio, feature, fps, frames, low, high, smooth=0.0, attack=0.0, release=0.2, invert=False
    ):
        from ..engine.video.audio_features import (
            ScheduleMapping,
            analyse_audio,
            feature_schedule,
            schedule_text,
        )

        features = analyse_audio(to_engine_audio(audio), float(fps), int(frames) or None)
        mapping = ScheduleMapping(
            feature, float(low), float(high), float(smooth), float(attack), float(release), bool(invert)
        )
        values = feature_schedule(features, mapping)
        info = (
            f"{feature} -> [{low:g}, {high:g}] over {features.frames} frames at {float(fps):g} fps: min "
            f"{values.min():.3f}, mean {values.mean():.3f}, max {values.max():.3f}\n{features.describe()}"
        )
        # Only `values` is a list output: ComfyUI passes the other outputs on as they are.
        return (
            [float(v) for v in values],
            schedule_text(values),
            float(values.mean()),
            features.frames,
            info,
        )


NODE_CLASS_MAPPINGS = {
    "CharForgeLoadAudio": LoadAudio,
    "CharForgeAudioPromptTravel": AudioPromptTravel,
    "CharForgeAudioSchedule": AudioSchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CharForgeLoadAudio": "Load Audio (CharForge)",
    "CharForgeAudioPromptTravel": "Audio Prompt Travel (CharForge)",
    "CharForgeAudioSchedule": "Audio Schedule (CharForge)",
}
