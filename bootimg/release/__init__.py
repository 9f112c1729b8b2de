"""Releases: from a manifest to a signed, reproducible directory of images and objects, and
back (verification). Builds on manifest, sources, composefs and signing."""
