"""Ray actors: thin wrappers that host the plain classes of each role on their own resources."""
