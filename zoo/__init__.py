"""seqzoo models: the registry, the causal-LM scaffold and the families.

    import zoo
    model = zoo.build("transformer", zoo.make_config("transformer", {"dim": 64}))
    logits, state, aux = model(tokens)
"""
from zoo.registry import ConformanceSpec, Entry, build, get, make_config, names, register  # noqa: F401
from zoo import lm  # noqa: F401
