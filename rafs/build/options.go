// Package build turns a directory or a tar into a RAFS v6 image: a bootstrap
// (written with rafs.WriteBootstrap) and data blobs named by the sha256 of
// their bytes.
//
// Directory mode chunks every regular file, compresses each chunk, drops
// chunks seen before in the same build, and writes one blob: chunk data, the
// chunk-info array and its 4 KiB header (spec §11). Tarfs mode (§12) reads
// only the tar's headers: the tar itself is the blob, files point at their
// data inside it, and blocks are 512 bytes.
//
// Builds are reproducible: the same input gives byte-identical bootstraps
// and blobs, whatever the number of workers.
package build

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// Type is the kind of image to build.
type Type int

const (
	// TypeDir chunks and compresses file data into a new blob.
	TypeDir Type = iota
	// TypeTarfs uses a tar as the blob and indexes it in place.
	TypeTarfs
)

func (t Type) String() string {
	switch t {
	case TypeDir:
		return "dir"
	case TypeTarfs:
		return "tarfs"
	}
	return fmt.Sprintf("type(%d)", int(t))
}

// ParseType is the inverse of Type.String.
func ParseType(s string) (Type, error) {
	switch s {
	case "dir":
		return TypeDir, nil
	case "tarfs":
		return TypeTarfs, nil
	}
	return 0, fmt.Errorf("build: unknown type %q (want dir or tarfs)", s)
}

// DefaultChunkSize is the chunk size nydus uses by default.
const DefaultChunkSize = 1 << 20

// Options control a build. Start from DefaultOptions: the zero Compressor
// is rafs.CompressNone.
type Options struct {
	// BlobDir receives the blobs, each named by its id. Required.
	BlobDir string
	// Compressor compresses chunks in directory mode (tarfs blobs are raw
	// tars: always none).
	Compressor rafs.Compressor
	// Digester digests chunks in directory mode (tarfs: always sha256).
	Digester rafs.Digester
	// ChunkSize is a power of two from 4 KiB to 16 MiB; 0 means 1 MiB.
	ChunkSize uint32
	// Workers bounds the goroutines digesting and compressing chunks;
	// 0 means GOMAXPROCS. The output does not depend on it.
	Workers int
	// BlobID, in tarfs mode, names the tar blob instead of its sha256
	// (for example the layer digest a registry already vouches for); the
	// tar is then not hashed. Ignored in directory mode.
	BlobID string
	// BlobMode is the permission of blob files the build writes (0 means
	// 0644); a tar it hard-links into BlobDir keeps the caller's.
	BlobMode os.FileMode
	// Exclude, in directory mode, names files and directories left out
	// of the image with everything below them: the build's own outputs
	// (the blob directory, the bootstrap and its temporary file) when
	// they lie inside the source. They are matched by identity (device
	// and inode, of the path and of what a symlink there points to), so
	// any spelling of a path works; one that does not exist when the
	// build starts is ignored. BlobDir is always left out.
	Exclude []string

	prior *priorChunks // set by LayerBuilder only
}

// DefaultOptions returns zstd, blake3 and 1 MiB chunks, as nydus-image
// does, writing blobs to blobDir.
func DefaultOptions(blobDir string) Options {
	return Options{
		BlobDir:    blobDir,
		Compressor: rafs.CompressZstd,
		Digester:   rafs.DigestBlake3,
		ChunkSize:  DefaultChunkSize,
	}
}

func (o *Options) normalize() error {
	if o.BlobDir == "" {
		return errors.New("build: no blob directory")
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if o.BlobMode == 0 {
		o.BlobMode = 0o644
	}
	if cs := o.ChunkSize; cs&(cs-1) != 0 || cs < rafs.MinChunkSize || cs > rafs.MaxChunkSize {
		return fmt.Errorf("build: chunk size %d: want a power of two from 4 KiB to 16 MiB", cs)
	}
	if o.Compressor.Flag() == 0 {
		return fmt.Errorf("build: unsupported compressor %v", o.Compressor)
	}
	if o.Digester != rafs.DigestBlake3 && o.Digester != rafs.DigestSHA256 {
		return fmt.Errorf("build: unsupported digester %v", o.Digester)
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	return nil
}

// Result describes a finished build.
type Result struct {
	Bootstrap *rafs.WriteResult
	Blobs     []Blob // in blob-table order
}

// Blob is one data blob written to the blob directory.
type Blob struct {
	ID               string
	Path             string // BlobDir/ID
	Size             int64  // bytes in the blob file
	UncompressedSize uint64 // bytes of its uncompressed address space
	Chunks           uint32 // distinct chunks
	// Placed says how a tarfs blob got into BlobDir: "reflink",
	// "hardlink", "copy", or "decompressed gzip" / "decompressed zstd"
	// ("" in directory mode).
	Placed string
}
