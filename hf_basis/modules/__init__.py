"""The nn.Modules users see."""
