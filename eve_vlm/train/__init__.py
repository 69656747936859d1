"""Training: recipes, trainable-parameter rules, the Trainer subclass and the three stages."""
