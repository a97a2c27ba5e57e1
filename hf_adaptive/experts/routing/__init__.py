"""The parts `Router` is composed of: nearest-profile search (`index`), the normalisation statistics
(`normalization`), learned scorers and their fitting (`scorers`), the decision rules (`decisions`) and the
resumable state (`state`). Import from `hf_adaptive.experts.router` / `hf_adaptive.experts`; these modules are
the implementation."""
