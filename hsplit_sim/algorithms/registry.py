"""The algorithms by name. Each algorithm module registers its class; the class's `Config` (a subclass of
scenario.schema.AlgorithmConfig) is what a scenario's `algorithm:` section is validated against."""

ALGORITHMS: dict[str, type] = {}


def register(cls: type) -> type:
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} is registered twice")
    ALGORITHMS[cls.name] = cls
    return cls
