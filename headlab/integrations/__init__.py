"""headlab underneath the tools interpretability notebooks already use: TransformerLens
(`transformer_lens.to_bridge` / `from_bridge`) and nnsight (`nnsight.language_model` /
`from_nnsight`). Each is imported only when used (extras `headlab[tl]`, `headlab[nnsight]`)."""
