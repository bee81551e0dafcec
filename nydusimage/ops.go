package nydusimage

import (
	"bufio"
	"context"
	"encoding/json"

	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
	"github.com/rafsnbd/rafsnbd/verity"
)

// BlobJSON is one blob of inspect's "blobs" request. nydus-snapshotter
// looks for "blob_id":"ID" in the output, so the encoding must stay
// compact (encoding/json's).
type BlobJSON struct {
	BlobID           string `json:"blob_id"`
	CompressedSize   uint64 `json:"compressed_size"`
	DecompressedSize uint64 `json:"decompressed_size"`
	ChunkCount       uint32 `json:"chunk_count"`
	ChunkSize        uint32 `json:"chunk_size"`
	MappedBlkAddr    uint32 `json:"mapped_blkaddr"`
}

// InspectBlobs returns the answer to inspect's "blobs" request on the
// bootstrap at path: a JSON array of its blob table, in table order.
func InspectBlobs(path string) ([]byte, error) {
	img, err := rafs.Open(path)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	blobs := make([]BlobJSON, len(img.Blobs))
	for i := range img.Blobs {
		e := &img.Blobs[i]
		blobs[i] = BlobJSON{
			BlobID:           e.ID(),
			CompressedSize:   e.CompressedSize,
			DecompressedSize: e.UncompressedSize,
			ChunkCount:       e.ChunkCount,
			ChunkSize:        e.ChunkSize,
		}
		if i < len(img.DeviceSlots) {
			blobs[i].MappedBlkAddr = img.DeviceSlots[i].MappedBlkAddr
		}
	}
	return json.Marshal(blobs)
}

// Merge writes to out the image bootstrap of the layer bootstraps at
// layers, lowest layer first (see build.Merge). out appears whole or not
// at all.
func Merge(ctx context.Context, out string, layers []string) (*build.Result, error) {
	f, err := atomicfile.Create(out)
	if err != nil {
		return nil, err
	}
	defer f.Abort()
	bw := bufio.NewWriterSize(f, 1<<20)
	res, err := build.MergeFiles(ctx, layers, bw, build.MergeOptions{Names: layers})
	if err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if err := f.Chmod(0o644); err != nil {
		return nil, err
	}
	if err := f.Commit(); err != nil {
		return nil, err
	}
	return res, nil
}

// ExportOptions control ExportBlock.
type ExportOptions struct {
	// Verity appends a dm-verity tree with nydus' parameters
	// (verity.NydusParams: sha256, 4 KiB hash blocks, one data block per
	// EROFS block, no salt, the tree at the next 4 KiB boundary).
	Verity bool
	// Compat is what fills the tree's unused digest slots:
	// verity.Standard (zeros) is what `veritysetup verify` accepts;
	// verity.NydusCompat reproduces nydus-image's bytes and root hash.
	// The kernel accepts both.
	Compat verity.Compat
}

// ExportBlock writes the flat EROFS disk of the bootstrap at bootstrap,
// with its blobs read from localfsDir (one file per blob id), to output,
// which appears whole or not at all. With opts.Verity the result's Tree
// describes the appended tree; Tree.Options() is the line nydus-image
// prints.
func ExportBlock(ctx context.Context, bootstrap, localfsDir, output string, opts ExportOptions) (*blockdev.ExportResult, error) {
	img, err := blockdev.Open(ctx, bootstrap, blockdev.LocalBlobs{Dir: localfsDir})
	if err != nil {
		return nil, err // names bootstrap
	}
	defer img.Close()
	var eo blockdev.ExportOptions
	if opts.Verity {
		p := oci.VerityParams(img.Composed, opts.Compat)
		eo.Verity = &p
	}
	return blockdev.Export(ctx, img, output, eo)
}
