"""numbabn_plugins: extra normalization layers, registered through the
``numbabn.layers`` entry-point group exactly as a third-party package would."""
