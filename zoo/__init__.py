"""seqzoo models: the registry, the causal-LM scaffold, Hugging Face import and the families.

    import zoo
    model = zoo.build("transformer", zoo.make_config("transformer", {"dim": 64}))
    logits, state, aux = model(tokens)
    model = zoo.hf.load("path/to/hf_checkpoint")

`import zoo` registers every family (`zoo/families.py`, one line per family). Inside `zoo/` the
imports form no cycle: registry, lm and hf import no family; families import registry, lm, hf.
"""
from zoo import (
    families,  # noqa: F401  (registers every family's models and converters)
    hf,  # noqa: F401
    lm,  # noqa: F401
)
from zoo.registry import (  # noqa: F401
    ConformanceSpec,
    Entry,
    ParamGroup,
    build,
    get,
    make_config,
    names,
    register,
)
