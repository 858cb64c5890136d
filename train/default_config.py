"""The built-in default config as a config file (used when only --config.* overrides are given).

Same as `train.config.default_config()`."""


def get_config(arg=None):
    from train import config
    if arg:
        raise ValueError(f"the built-in default has no variant {arg!r}")
    return config.default_config()
