package blockdev

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// BlobReader is one blob's uncompressed address space. The blobcache
// Handles that CachedBlobs and LocalBlobs return also implement
// ReaderAtContext and MayStall, which Composed passes on.
type BlobReader interface {
	io.ReaderAt
	io.Closer
}

// BlobOpener finds blobs by their blob-table entry; chunkTable is the
// bootstrap's chunk table, which holds the digests their chunks are
// checked against.
type BlobOpener interface {
	OpenBlob(ctx context.Context, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (BlobReader, error)
}

// CachedBlobs opens blobs from Store through Cache: disk-backed or
// memory-only, every chunk verified before it is served, a blob that
// several images use opened once.
type CachedBlobs struct {
	Cache *blobcache.Cache
	Store blobcache.Store
}

// OpenBlob implements BlobOpener.
func (c CachedBlobs) OpenBlob(ctx context.Context, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (BlobReader, error) {
	return c.Cache.OpenBlob(ctx, c.Store, e, chunkTable)
}

// Image is a bootstrap composed with its blobs into one device.
type Image struct {
	*Composed
	Rafs *rafs.Image
	// Blobs are the blob readers by blob index, as the BlobOpener returned
	// them (for CachedBlobs, *blobcache.Handle: prefetch, stats).
	Blobs   []BlobReader
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
	img := &Image{Rafs: ri, closers: []io.Closer{ri}, Blobs: make([]BlobReader, len(ri.Blobs))}
	readers := make([]io.ReaderAt, len(ri.Blobs))
	for i := range ri.Blobs {
		e := &ri.Blobs[i]
		r, err := blobs.OpenBlob(ctx, e, ri.ChunkTable)
		if err != nil {
			img.Close()
			return nil, fmt.Errorf("blockdev: blob %d (%s): %w", i, e.ID(), err)
		}
		img.closers = append(img.closers, r)
		img.Blobs[i], readers[i] = r, r
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

// localBlobsMemory bounds the decompressed chunks LocalBlobs keeps per
// blob: enough for sequential readers (exports) to decompress each chunk
// once.
const localBlobsMemory = 32 << 20

// LocalBlobs opens blobs from a directory holding one file per blob, named
// by blob id (nydus' localfs layout), each through a memory-only blob
// cache of its own (see blobcache.OpenMemory): chunks are decompressed and
// their digests checked as they are read. Code that opens several images,
// or wants one memory bound, uses CachedBlobs with one cache instead.
type LocalBlobs struct{ Dir string }

// OpenBlob implements BlobOpener.
func (l LocalBlobs) OpenBlob(ctx context.Context, e *rafs.BlobEntry, chunkTable []rafs.ChunkInfo) (BlobReader, error) {
	c, err := blobcache.OpenMemory(&blobcache.Options{MemoryLimit: localBlobsMemory})
	if err != nil {
		return nil, err
	}
	h, err := c.OpenBlob(ctx, localfs.New(l.Dir), e, chunkTable)
	if err != nil {
		c.Close()
		return nil, err
	}
	return &ownBlob{Handle: h, cache: c}, nil
}

// ownBlob is a Handle whose cache is its own.
type ownBlob struct {
	*blobcache.Handle
	cache *blobcache.Cache
}

func (o *ownBlob) Close() error { return errors.Join(o.Handle.Close(), o.cache.Close()) }
