"""composefs: the image format core (tree model, dump files, EROFS writer and reader,
fs-verity digests, object store). It knows nothing about boot; everything else builds on it."""
