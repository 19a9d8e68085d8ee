"""Training one forget adapter: config, losses, trainer, teacher cache, answer keys, stopping, `forget`."""
