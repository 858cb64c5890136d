"""Imports every family module so that their `@register` calls run. Add one line per family."""
import zoo.atlas  # noqa: F401
import zoo.deep_transformer  # noqa: F401
import zoo.gam  # noqa: F401
import zoo.hydra  # noqa: F401
import zoo.linear_memory  # noqa: F401
import zoo.lssl  # noqa: F401
import zoo.mamba  # noqa: F401
import zoo.memmamba  # noqa: F401
import zoo.miras  # noqa: F401
import zoo.mom  # noqa: F401
import zoo.rat  # noqa: F401
import zoo.titans  # noqa: F401
import zoo.transformer  # noqa: F401
