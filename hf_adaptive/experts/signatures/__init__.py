"""The three encoders a `TaskSignature` is composed of: the description (`text`), a sketch of the answer-loss
gradient (`gradient`) and statistics of the inputs (`context`), with the seeded projections they share
(`projection`) and the backbone helpers (`backbone`). Import from `hf_adaptive.experts.signature` /
`hf_adaptive.experts`; these modules are the implementation."""
