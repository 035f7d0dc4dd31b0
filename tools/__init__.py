"""Developer and operator tools outside the runtime layers (nothing in core, actors, serving or pipeline imports
them): the offline KubeRay manifest validator and its kustomize renderer (`python -m rayrlhf.tools.k8s_validate
k8s/`), and the generator of the config reference in docs/config.md (`python -m rayrlhf.tools.config_docs`)."""
