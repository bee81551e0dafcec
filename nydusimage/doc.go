// Package nydusimage performs the nydus-image operations that
// nydus-snapshotter's tarfs mode runs (pkg/tarfs in nydus-snapshotter
// v0.16), with rafsnbd's builder, merger and exporter, and parses
// nydus-image's command-line grammar for them:
//
//	create --type tar-tarfs --bootstrap FILE --blob-id ID --blob-dir DIR TAR
//	inspect -R blobs FILE
//	merge --bootstrap OUT LAYER.boot...
//	export --block --localfs-dir DIR --bootstrap FILE --output DISK [--verity]
//
// The outputs are what the snapshotter reads: the bootstrap and disk files,
// inspect's JSON (each blob as "blob_id":"ID"), and export's
// "dm-verity options: ..." line, first on stdout.
package nydusimage
