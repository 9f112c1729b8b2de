"""bootimg: verified composefs images, signed releases, boot units and boot KPIs."""

__version__ = "0.1.0"
