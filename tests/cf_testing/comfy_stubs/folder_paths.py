"""Stand-in for ComfyUI's ``folder_paths`` (the parts a node pack uses), after ComfyUI 0.3.64.

`set_base_directory()` is harness-only: it plays the role of ``--base-directory``.
"""

import os
import time

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

folder_names_and_paths = {}
base_path = ""
models_dir = ""
output_directory = ""
temp_directory = ""
input_directory = ""
user_directory = ""

_LEGACY = {"clip": "text_encoders", "unet": "diffusion_models"}


def map_legacy(folder_name):
    return _LEGACY.get(folder_name, folder_name)


def set_base_directory(path):
    """Rebuild the registry for a base directory, with ComfyUI's built-in keys."""
    global base_path, models_dir, output_directory, temp_directory, input_directory, user_directory
    base_path = os.path.abspath(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    temp_directory = os.path.join(base_path, "temp")
    input_directory = os.path.join(base_path, "input")
    user_directory = os.path.join(base_path, "user")
    folder_names_and_paths.clear()
    pt = supported_pt_extensions  # one shared set object, as in ComfyUI
    for key, dirs, exts in (
        ("checkpoints", ["checkpoints"], pt),
        ("configs", ["configs"], [".yaml"]),
        ("loras", ["loras"], pt),
        ("vae", ["vae"], pt),
        ("text_encoders", ["text_encoders", "clip"], pt),
        ("diffusion_models", ["unet", "diffusion_models"], pt),
        ("clip_vision", ["clip_vision"], pt),
        ("style_models", ["style_models"], pt),
        ("embeddings", ["embeddings"], pt),
        ("diffusers", ["diffusers"], ["folder"]),
        ("vae_approx", ["vae_approx"], pt),
        ("controlnet", ["controlnet", "t2i_adapter"], pt),
        ("gligen", ["gligen"], pt),
        ("upscale_models", ["upscale_models"], pt),
        ("hypernetworks", ["hypernetworks"], pt),
        ("photomaker", ["photomaker"], pt),
        ("classifiers", ["classifiers"], {""}),
    ):
        folder_names_and_paths[key] = ([os.path.join(models_dir, d) for d in dirs], exts)
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())
    for key in ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models"):
        sub = {"text_encoders": "clip"}.get(key, key)
        add_model_folder_path(key, os.path.join(output_directory, sub))


def set_output_directory(output_dir):
    global output_directory
    output_directory = output_dir


def set_temp_directory(temp_dir):
    global temp_directory
    temp_directory = temp_dir


def set_input_directory(input_dir):
    global input_directory
    input_directory = input_dir


def get_output_directory():
    return output_directory


def get_temp_directory():
    return temp_directory


def get_input_directory():
    return input_directory


def get_user_directory():
    return user_directory


def get_directory_by_type(type_name):
    return {"output": output_directory, "temp": temp_directory, "input": input_directory}.get(type_name)


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    folder_name = map_legacy(folder_name)
    if folder_name in folder_names_and_paths:
        paths, _exts = folder_names_and_paths[folder_name]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name):
    folder_name = map_legacy(folder_name)
    return folder_names_and_paths[folder_name][0][:]


def _filter(files, extensions):
    if not extensions:
        return sorted(files)
    return sorted(f for f in files if os.path.splitext(f)[1].lower() in extensions or "" in extensions)


def get_filename_list(folder_name):
    folder_name = map_legacy(folder_name)
    paths, extensions = folder_names_and_paths[folder_name]
    found = set()
    for base in paths:
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                found.add(os.path.relpath(os.path.join(root, name), base).replace(os.sep, "/"))
    return _filter(found, extensions)


def get_full_path(folder_name, filename):
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for base in folder_names_and_paths[folder_name][0]:
        full = os.path.join(base, filename)
        if os.path.isfile(full):
            return full
        if os.path.islink(full):
            continue
    return None


def get_full_path_or_raise(folder_name, filename):
    full = get_full_path(folder_name, filename)
    if full is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full


def annotated_filepath(name):
    for suffix, directory in (
        (" [output]", output_directory),
        (" [input]", input_directory),
        (" [temp]", temp_directory),
    ):
        if name.endswith(suffix):
            return name[: -len(suffix)], directory
    return name, None


def get_annotated_filepath(name, default_dir=None):
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base_dir, name)


def exists_annotated_filepath(name):
    return os.path.exists(get_annotated_filepath(name))


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    def counter_of(filename):
        prefix_len = len(os.path.basename(filename_prefix))
        prefix = filename[: prefix_len + 1]
        try:
            digits = int(filename[prefix_len + 1 :].split("_")[0])
        except ValueError:
            digits = 0
        return digits, prefix

    if "%" in filename_prefix:
        now = time.localtime()
        for token, value in (
            ("%width%", image_width),
            ("%height%", image_height),
            ("%year%", now.tm_year),
            ("%month%", f"{now.tm_mon:02}"),
            ("%day%", f"{now.tm_mday:02}"),
            ("%hour%", f"{now.tm_hour:02}"),
            ("%minute%", f"{now.tm_min:02}"),
            ("%second%", f"{now.tm_sec:02}"),
        ):
            filename_prefix = filename_prefix.replace(token, str(value))
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    common = os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))
    if common != output_dir:
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}"
        )
    try:
        counter = (
            max(
                c
                for c, p in (counter_of(f) for f in os.listdir(full_output_folder))
                if os.path.normcase(p[:-1]) == os.path.normcase(filename) and p[-1] == "_"
            )
            + 1
        )
    except (ValueError, FileNotFoundError):
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder, filename_prefix
