"""What the node pack and the driver share: plain, torch-free values and helpers (standard library and PyYAML).

- `characters`: the character-preset schema (fields, defaults, validation, prompt building)
- `model_folders`: the model folders the pack registers and the ComfyUI folders it reads
- `config_file`: where the CharForge config file is
- `safe_yaml`: reading users' small YAML files without alias bombs
- `retry`: one retry policy (jittered exponential backoff, Retry-After)

The pack imports these modules relatively, the driver and the recipes as ``charforge.common``; they import
nothing else of CharForge, so either side can use them without the other (tests/pack/test_architecture.py).
"""
