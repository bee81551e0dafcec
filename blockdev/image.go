package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/rafsnbd/rafsnbd/rafs"
)

// BlobReader is one blob's uncompressed address space.
type BlobReader interface {
	io.ReaderAt
	io.Closer
}

// BlobOpener finds blobs by their blob-table entry. A local directory is
// one (LocalBlobs); the lazy cache is another.
type BlobOpener interface {
	OpenBlob(ctx context.Context, e *rafs.BlobEntry) (BlobReader, error)
}

// Image is a bootstrap composed with its blobs into one device.
type Image struct {
	*Composed
	Rafs    *rafs.Image
	closers []io.Closer
}

// Close releases the bootstrap and the blobs.
func (img *Image) Close() error {
	var errs []error
	for _, c := range img.closers {
		errs = append(errs, c.Close())
	}
	img.closers = nil
	return errors.Join(errs...)
}

// Open parses the bootstrap at path, opens every blob it names through
// blobs, and composes the flat device. The same call serves layer mode (a
// layer's bootstrap and its tar) and image mode (a merged bootstrap and
// every layer's tar): the bootstrap's device table says which blobs go
// where.
func Open(ctx context.Context, bootstrapPath string, blobs BlobOpener) (*Image, error) {
	ri, err := rafs.Open(bootstrapPath)
	if err != nil {
		return nil, err
	}
	img, err := OpenRafs(ctx, ri, blobs)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", bootstrapPath, err)
	}
	return img, nil
}

// OpenRafs is Open for a bootstrap already parsed; the Image takes ri over
// and closes it.
func OpenRafs(ctx context.Context, ri *rafs.Image, blobs BlobOpener) (*Image, error) {
	img := &Image{Rafs: ri, closers: []io.Closer{ri}}
	readers := make([]io.ReaderAt, len(ri.Blobs))
	for i := range ri.Blobs {
		e := &ri.Blobs[i]
		r, err := blobs.OpenBlob(ctx, e)
		if err != nil {
			img.Close()
			return nil, fmt.Errorf("blockdev: blob %d (%s): %w", i, e.ID(), err)
		}
		img.closers = append(img.closers, r)
		readers[i] = r
	}
	var err error
	img.Composed, err = Compose(ri, ri.ReaderAt(), readers)
	if err != nil {
		img.Close()
		return nil, err
	}
	return img, nil
}

// AddCloser makes Close also close c, after what the image already holds:
// for resources the blobs depend on, such as the cache they came from.
func (img *Image) AddCloser(c io.Closer) { img.closers = append(img.closers, c) }

// ErrNotFlattenable is returned for images whose blobs cannot be laid out
// in one address space.
var ErrNotFlattenable = errors.New("blockdev: image cannot be flattened into a block device")

// sizer is implemented by blob readers that know their size.
type sizer interface{ Size() int64 }

// Compose lays out the flat device of img (§14 of the format notes): the
// bootstrap's blocks from block 0, then blob i's uncompressed space at
// mapped_blkaddr of device slot i, in blob-table order, zeros in between.
// blobs[i] is blob i's uncompressed space. Blocks are the image's EROFS
// blocks, 512 bytes for tarfs. A blob's uncompressed size is cut to whole
// blocks, as nydus does.
func Compose(img *rafs.Image, bootstrap io.ReaderAt, blobs []io.ReaderAt) (*Composed, error) {
	if len(blobs) != len(img.Blobs) {
		return nil, fmt.Errorf("blockdev: %d blob readers for %d blobs", len(blobs), len(img.Blobs))
	}
	bs := uint64(img.BlockSize)
	if bs == 0 || img.Size <= 0 || uint64(img.Size)%bs != 0 {
		return nil, fmt.Errorf("blockdev: bootstrap of %d bytes is not whole %d-byte blocks", img.Size, bs)
	}
	extents := []Extent{{Name: "bootstrap", Offset: 0, Length: img.Size, Source: bootstrap}}
	end := uint64(img.Size) / bs // in blocks
	for i := range img.Blobs {
		e, slot := &img.Blobs[i], &img.DeviceSlots[i]
		addr := uint64(slot.MappedBlkAddr)
		if addr == 0 {
			return nil, fmt.Errorf("%w: mapped block address of blob %d (%s) is zero (built by an old builder; rebuild the bootstrap)",
				ErrNotFlattenable, i, e.ID())
		}
		if addr < end {
			return nil, fmt.Errorf("%w: blob %d (%s) maps to block %d, inside the previous range ending at block %d",
				ErrNotFlattenable, i, e.ID(), addr, end)
		}
		blocks := e.UncompressedSize / bs
		length := blocks * bs
		if s, ok := blobs[i].(sizer); ok && uint64(s.Size()) < length {
			return nil, fmt.Errorf("blockdev: blob %d (%s) has %d bytes, the bootstrap says %d",
				i, e.ID(), s.Size(), e.UncompressedSize)
		}
		extents = append(extents, Extent{Name: "blob " + e.ID(), Offset: int64(addr * bs), Length: int64(length), Source: blobs[i]})
		end = addr + blocks
	}
	const maxDeviceBytes = 1 << 62
	if end > maxDeviceBytes/bs {
		return nil, fmt.Errorf("%w: device of %d blocks is too large", ErrNotFlattenable, end)
	}
	return New(int64(end*bs), uint32(bs), extents)
}

// LocalBlobs opens blobs from a directory holding one file per blob, named
// by blob id (nydus' localfs layout). Tarfs blobs are served as they are;
// compressed blobs are decompressed chunk by chunk as they are read.
type LocalBlobs struct{ Dir string }

// OpenBlob implements BlobOpener.
func (l LocalBlobs) OpenBlob(_ context.Context, e *rafs.BlobEntry) (BlobReader, error) {
	f, err := os.Open(filepath.Join(l.Dir, filepath.Base(e.ID())))
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if e.IsTarfs() {
		return &sizedFile{File: f, size: fi.Size()}, nil
	}
	if uint64(fi.Size()) < e.CompressedSize {
		f.Close()
		return nil, fmt.Errorf("%s is %d bytes, the bootstrap says %d: truncated blob", f.Name(), fi.Size(), e.CompressedSize)
	}
	chunks, err := rafs.ReadBlobChunks(f, e)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return &uncompressedFile{UncompressedReader: rafs.NewUncompressedReader(f, e, chunks), f: f}, nil
}

type sizedFile struct {
	*os.File
	size int64
}

func (s *sizedFile) Size() int64 { return s.size }

type uncompressedFile struct {
	*rafs.UncompressedReader
	f *os.File
}

func (u *uncompressedFile) Close() error { return u.f.Close() }
