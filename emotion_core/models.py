"""Model registry in the style of timm's create_model.

Contract (signatures fixed):
    register_model(name, input_spec: InputSpec, description: str) -> decorator over fn(num_classes) -> nn.Module
    list_models() -> list[str]                # ["cnn", "efficientnet_b2", "emonet"]
    get_input_spec(name) -> InputSpec
    create_model(name, num_classes, init_weights: str | None = None) -> nn.Module
        unknown name -> UnknownModelError(ValueError) listing the choices;
        init_weights: local path or s3:// URI of a .safetensors (or .pth loaded weights_only=True)
        file; shape mismatch -> ValueError naming the parameter (classifier head may be skipped
        when only its shape differs).
    count_parameters(model) -> int
"""
