package oci

import (
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/verity"
)

// The conventions nydus-snapshotter's tarfs mode keeps for exported disks,
// which convert, export and the nydus-image front end follow.

// DiskName is the file name nydus-snapshotter gives the disk exported for
// blob id: kind "image" for a merged image (named after its last blob) or
// "layer" for one layer.
func DiskName(blobID, kind string) string { return blobID + "." + kind + ".disk" }

// VerityParams are the tree parameters nydus uses for an export of d: one
// data block per EROFS block, the tree appended at the next 4 KiB.
func VerityParams(d *blockdev.Composed, compat verity.Compat) verity.Params {
	p := verity.NydusParams(uint64(d.Size()), int(d.BlockSize()))
	p.Compat = compat
	return p
}
