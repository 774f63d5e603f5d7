"""Custom ComfyUI value types the pack passes between its nodes.

Each is a plain string ComfyUI matches exactly when wiring sockets. Every custom type a node declares
must be listed here with what it carries (the node-contract test enforces it).
"""

CUSTOM_TYPES: dict[str, str] = {}

# Score stage (nodes/score.py)
CUSTOM_TYPES.update(
    {
        "CHARFORGE_FACE_MODELS": "A loaded InsightFace pack (detector + ArcFace recogniser): charforge.engine.faces.FaceAnalyzer.",
        "CHARFORGE_IDENTITY": "A reference identity (ArcFace centroid, calibration baseline, suggested threshold): "
        "charforge.engine.score.ReferenceIdentity.",
        "CHARFORGE_SCORES": "Per-image scores of a batch (identity, CLIP or combined) with pass/fail and reasons: "
        "charforge.engine.score.ScoreSheet.",
        "CHARFORGE_CLIP": "A loaded CLIP model (vision + text) for image-prompt scores: charforge.engine.score.clip.ClipScorer.",
    }
)

# Dataset stage (nodes/dataset.py)
CUSTOM_TYPES.update(
    {
        "CHARFORGE_DATASET": "A dataset manifest: one entry per photo (source, working file, size, SHA-256, scores, "
        "faces, duplicate group, bucket, caption, augmentations, rejection reasons), saved as "
        "manifest.json in the dataset's folder: charforge.engine.dataset.DatasetManifest.",
    }
)

# Train stage (nodes/train.py)
CUSTOM_TYPES.update(
    {
        "CHARFORGE_TRAINING_RUN": "A training run: run folder, state, step, loss, the LoRA's path and its name in the "
        "loras folder, sample and loss-curve images: charforge.engine.train.run.TrainingRun.",
    }
)

# Video stage (nodes/video.py)
CUSTOM_TYPES.update(
    {
        "CHARFORGE_VIDEO_MODEL": "What a video model is made of (base checkpoint, AnimateDiff motion module, character "
        "and motion LoRAs with strengths, runtime options); the engine keeps the loaded "
        "pipeline: charforge.engine.video.VideoModelSpec.",
    }
)

# Synthesis stage (nodes/synth.py)
CUSTOM_TYPES.update(
    {
        "CHARFORGE_FACE_SWAPPER": "A loaded InsightFace face swapper (inswapper_128.onnx): charforge.engine.synth.FaceSwapper.",
        "CHARFORGE_FACE_RESTORER": "A loaded face-restoration model (GFPGAN, CodeFormer, RestoreFormer) through spandrel: "
        "charforge.engine.synth.ImageModel.",
    }
)
