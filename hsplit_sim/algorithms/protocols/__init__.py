"""A round's protocol, written once per family: split (SplitLoRA, HSplitLoRA), federated (every client trains
the whole model) and centralised (the server trains on pooled data). Algorithm modules subclass one and fill
in their decisions: plans, aggregation rule, what goes back to each client."""
