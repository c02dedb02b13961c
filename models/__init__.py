"""Model builders and the LightningModules that train them."""
