"""Parameter-space merging: methods (pure tensor maths), recipes, and the in-place materializer."""
