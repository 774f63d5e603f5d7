"""One scenario of ComfyUI module calls, run both on the stand-ins and on a real ComfyUI's modules.

    python stub_scenario.py WORKDIR      (with either the stand-ins or ComfyUI's root first on sys.path)

Prints a JSON record of what each call returned or raised; the integration suite checks both records are
equal, which is how we know the stand-ins behave like ComfyUI where the pack relies on them. Paths in the
record are relative to WORKDIR so the two runs compare.
"""

import json
import os
import sys


def main(workdir: str) -> dict:
    try:  # real ComfyUI: parse "--cpu" so model_management does not look for a GPU
        import comfy.options

        comfy.options.enable_args_parsing()
        sys.argv = [sys.argv[0], "--cpu"]
    except ImportError:  # the stand-ins have no options module
        pass
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    record: dict = {}

    def rel(path):
        return None if path is None else os.path.relpath(path, workdir)

    def attempt(name, fn):
        try:
            record[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the record compares exception types and messages
            record[name] = {
                "raised": type(exc).__name__,
                "message": str(exc).replace(workdir, "<W>").replace(os.path.dirname(workdir), "<P>"),
            }

    # --- folder registry: a new key, as the pack registers its folders
    models = os.path.join(workdir, "models")
    motion = os.path.join(models, "animatediff_models")
    extra = os.path.join(workdir, "shared", "motion")
    for folder in (motion, os.path.join(motion, "sub"), extra):
        os.makedirs(folder, exist_ok=True)
    for path in (
        os.path.join(motion, "mm_v2.ckpt"),
        os.path.join(motion, "sub", "v3.safetensors"),
        os.path.join(motion, "readme.txt"),
        os.path.join(extra, "shared.pth"),
    ):
        with open(path, "wb") as fh:
            fh.write(b"x")
    shared_set = folder_paths.supported_pt_extensions
    record["pt_extensions"] = sorted(shared_set)
    folder_paths.add_model_folder_path("animatediff_models", extra)
    record["new_key_extensions_empty"] = folder_paths.folder_names_and_paths["animatediff_models"][1] == set()
    record["listed_with_empty_extensions"] = folder_paths.get_filename_list("animatediff_models")
    folder_paths.add_model_folder_path("animatediff_models", motion)
    folder_paths.add_model_folder_path("animatediff_models", motion)  # twice: no duplicate
    paths, _ = folder_paths.folder_names_and_paths["animatediff_models"]
    folder_paths.folder_names_and_paths["animatediff_models"] = (paths, set(shared_set))
    record["paths"] = [rel(p) for p in folder_paths.get_folder_paths("animatediff_models")]
    record["listed"] = folder_paths.get_filename_list("animatediff_models")
    record["full_path"] = rel(folder_paths.get_full_path("animatediff_models", "sub/v3.safetensors"))
    record["full_path_missing"] = folder_paths.get_full_path("animatediff_models", "nope.ckpt")
    record["full_path_unknown_key"] = folder_paths.get_full_path("no_such_key", "x.ckpt")
    attempt("or_raise", lambda: folder_paths.get_full_path_or_raise("animatediff_models", "nope.ckpt"))
    attempt("paths_unknown_key", lambda: folder_paths.get_folder_paths("no_such_key"))
    attempt("list_unknown_key", lambda: folder_paths.get_filename_list("no_such_key"))
    folder_paths.add_model_folder_path("animatediff_models", os.path.join(workdir, "first"), is_default=True)
    record["is_default_prepends"] = rel(folder_paths.get_folder_paths("animatediff_models")[0])
    record["legacy_clip"] = folder_paths.map_legacy("clip")
    # --- save paths and counters
    out = os.path.join(workdir, "output")
    folder_paths.set_output_directory(out)
    folder_paths.set_input_directory(os.path.join(workdir, "input"))
    record["annotated"] = list(folder_paths.annotated_filepath("x.png [output]"))
    record["annotated"][1] = rel(record["annotated"][1])
    record["annotated_input"] = rel(folder_paths.get_annotated_filepath("y.png"))
    os.makedirs(os.path.join(out, "video"), exist_ok=True)
    for name in ("ComfyUI_00001_.png", "ComfyUI_00007_.webp", "Other_00009_.png"):
        open(os.path.join(out, name), "wb").close()
    folder, filename, counter, subfolder, prefix = folder_paths.get_save_image_path("ComfyUI", out, 64, 64)
    record["save"] = [rel(folder), filename, counter, subfolder, prefix]
    folder, filename, counter, subfolder, prefix = folder_paths.get_save_image_path(
        "video/clip_%width%", out, 32, 16
    )
    record["save_sub"] = [rel(folder), filename, counter, subfolder, prefix]
    attempt("save_escape", lambda: folder_paths.get_save_image_path("../../evil", out)[2])

    # --- progress bar and the interrupt flag
    calls = []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        mm.throw_exception_if_processing_interrupted()
        calls.append([value, total, node_id])

    comfy.utils.set_progress_bar_global_hook(hook)
    bar = comfy.utils.ProgressBar(5, node_id="9")
    bar.update(2)
    bar.update_absolute(9)
    bar.update_absolute(1, total=3)
    record["progress_calls"] = calls[:]
    mm.interrupt_current_processing(True)
    record["flag_set"] = mm.processing_interrupted()
    attempt("update_after_interrupt", lambda: bar.update(1))
    record["flag_after_raise"] = mm.processing_interrupted()
    record["interrupt_is_exception_subclass"] = issubclass(mm.InterruptProcessingException, Exception)
    comfy.utils.set_progress_bar_global_hook(None)
    return record


if __name__ == "__main__":
    workdir = os.path.abspath(sys.argv[1])
    print(json.dumps(main(workdir), sort_keys=True))
