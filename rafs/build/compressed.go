package build

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/internal/ctxio"
)

// Compression is how a tar given to FromTar is compressed.
type Compression string

const (
	Uncompressed Compression = ""
	Gzip         Compression = "gzip"
	Zstd         Compression = "zstd"
)

// Magic bytes: RFC 1952 for gzip, RFC 8878 for a zstd frame. A tar starts
// with its first entry's name, which neither prefix plausibly begins.
var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// ZstdMaxWindow bounds the memory a zstd frame may ask for: zstd -19
// --long uses 128 MiB windows at most.
const ZstdMaxWindow = 1 << 27

// DetectCompression tells a gzip or zstd stream from a plain tar by its
// first bytes.
func DetectCompression(r io.ReaderAt, size int64) (Compression, error) {
	var magic [4]byte
	n, err := r.ReadAt(magic[:min(size, int64(len(magic)))], 0)
	if n < int(min(size, int64(len(magic)))) {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return "", fmt.Errorf("build: reading the tar's first bytes: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic[:n], zstdMagic):
		return Zstd, nil
	case bytes.HasPrefix(magic[:n], gzipMagic):
		return Gzip, nil
	}
	return Uncompressed, nil
}

// NewDecompressReader returns the uncompressed stream of r.
func NewDecompressReader(c Compression, r io.Reader) (io.ReadCloser, error) {
	switch c {
	case Uncompressed:
		return io.NopCloser(r), nil
	case Gzip:
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		return zr, nil
	case Zstd:
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(ZstdMaxWindow))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		return zr.IOReadCloser(), nil
	}
	return nil, fmt.Errorf("unknown compression %q", string(c))
}

// decompressTar writes the uncompressed tar into the blob directory under
// a temporary name and returns it placed, named by its sha256, with its
// size. The blob of a tarfs image must be the tar itself: file data is
// addressed by its offset in it.
func decompressTar(ctx context.Context, r io.ReaderAt, size int64, c Compression, opts *Options) (*placedTar, int64, error) {
	if err := os.MkdirAll(opts.BlobDir, 0o755); err != nil {
		return nil, 0, fmt.Errorf("build: %w", err)
	}
	zr, err := NewDecompressReader(c, ctxio.NewReader(ctx, io.NewSectionReader(r, 0, size)))
	if err != nil {
		return nil, 0, fmt.Errorf("build: the %s-compressed tar: %w", c, err)
	}
	defer zr.Close()
	dst, err := newTarTemp(opts.BlobDir)
	if err != nil {
		return nil, 0, fmt.Errorf("build: %w", err)
	}
	h := sha256.New()
	n, err := io.CopyBuffer(io.MultiWriter(dst, h), zr, make([]byte, 1<<20))
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst.Name())
		return nil, 0, fmt.Errorf("build: decompressing the %s-compressed tar into %s: %w", c, opts.BlobDir, err)
	}
	id := hex.EncodeToString(h.Sum(nil))
	// Always hashed, even when the caller named the blob: a name given
	// for the compressed bytes (a layer digest) would be a wrong name for
	// the tar.
	if opts.BlobID != "" && opts.BlobID != id {
		os.Remove(dst.Name())
		return nil, 0, fmt.Errorf("build: blob id %s is not the sha256 of the decompressed tar (%s): a compressed layer's digest names the compressed bytes; give its diff_id", opts.BlobID, id)
	}
	return &placedTar{tmp: dst.Name(), dir: opts.BlobDir, id: id, owned: true, mode: opts.BlobMode, how: "decompressed " + string(c)}, n, nil
}
