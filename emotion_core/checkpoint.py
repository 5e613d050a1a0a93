"""Model checkpoints: a directory (local or S3 prefix) with model.safetensors + model.json.

Contract (signatures fixed):
    class CheckpointError(RuntimeError)     # message names the file and the problem
    @dataclass class ModelManifest:
        architecture: str; classes: list[str]; input_spec: InputSpec
        metrics: dict; training_config: dict; dataset_fingerprint: str | None
        created_at: str (ISO-8601 UTC); version: str (unique id, e.g. "20261121T213800Z-1a2b3c4d")
        format_version: int = 1
        to_dict()/from_dict()
    save_model(uri, model, manifest) -> str                 # returns uri; writes safetensors then json
    load_model(uri, device="cpu") -> tuple[nn.Module, ModelManifest]   # eval mode; never unpickles
    load_manifest(uri) -> ModelManifest
    resolve_model_uri(uri) -> str       # accepts a model dir or a pointer json (latest.json) -> model dir
    write_pointer(pointer_uri, model_uri, manifest) -> None    # atomic
"""
