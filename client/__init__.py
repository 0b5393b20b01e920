"""The hospital agent: Flower ClientApp handlers over medfusion_fl.site."""
