// Package oci converts OCI and Docker images into RAFS v6 tarfs images, the
// way nydus-snapshotter's tarfs mode does (spec §12, §16): every layer is
// pulled whole, its digest checked, decompressed into an uncompressed tar
// that becomes a blob as it is, and indexed by a tarfs bootstrap; the layer
// bootstraps are merged into an image bootstrap (OCI whiteouts applied,
// see build.Merge); optionally the flat EROFS disk of the image or of each
// layer is exported, with a dm-verity tree.
//
// Images come from a registry (go-containerregistry's reference syntax,
// credentials from authn.DefaultKeychain, plain HTTP with Insecure) or from
// an OCI image layout directory ("oci:PATH[:TAG]" or "oci:PATH@DIGEST").
//
// # Cache layout
//
// Everything lives under one cache directory (created 0750), content
// addressed so that layers shared by images are pulled and indexed once:
//
//	blobs/<diffid hex>                   uncompressed layer tar = tarfs blob
//	blobs/<top layer hex>.image.disk     image-mode export (§16)
//	blobs/<layer hex>.layer.disk         layer-mode export (§16)
//	layers/<diffid hex>.boot             the layer's tarfs bootstrap
//	images/<manifest hex>/image.boot     merged bootstrap of the image
//	images/<manifest hex>/image.json     what was converted (the commit mark)
//	locks/                               flock files, one per layer, image, disk
//	staging/                             work in progress, one dir per layer
//
// # Crash safety
//
// A result is published by rename(2) only once it is complete and synced:
// a layer counts as done when layers/<hex>.boot exists (renamed last, after
// its tar), an image when image.json exists (written last, after
// image.boot). Work in progress lives in temporary names that a later run
// removes under the same lock before it starts over, so an interrupted
// conversion (even kill -9) is never taken as done and is redone on the
// next run. Conversions of the same layer, image or disk file by several
// processes take a per-object flock: the later one waits, then reuses.
package oci
