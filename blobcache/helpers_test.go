package blobcache_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// testBlob is a synthetic RAFS blob: stored bytes, the blob table entry and
// bootstrap chunk table that describe it, and the uncompressed space a
// correct reader must produce.
type testBlob struct {
	stored []byte
	entry  rafs.BlobEntry
	table  []rafs.ChunkInfo
	plain  []byte // the uncompressed space, zeros between chunks
	chunks []rafs.BlobChunk
}

// makeBlob builds a blob of n chunks of up to chunkSize bytes (the last
// ones shorter, to leave alignment gaps) compressed with comp. Data is
// half text-like, half random, so some chunks do not compress and are
// stored raw, as builders do.
func makeBlob(t testing.TB, comp rafs.Compressor, dig rafs.Digester, n, chunkSize int, seed uint64) *testBlob {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	tb := &testBlob{}
	var uoff uint64
	words := []string{"chunk ", "blob ", "cache ", "nydus ", "rafs ", "erofs ", "block ", "\n"}
	for i := range n {
		size := chunkSize - rng.IntN(chunkSize/3+1)
		data := make([]byte, size)
		if i%4 == 3 {
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
		} else {
			for j := 0; j < size; {
				j += copy(data[j:], words[rng.IntN(len(words))])
			}
		}
		stored, err := rafs.Compress(comp, nil, data)
		if errors.Is(err, rafs.ErrNotSmaller) || comp == rafs.CompressNone {
			stored = data
		} else if err != nil {
			t.Fatal(err)
		}
		c := rafs.BlobChunk{
			CompressedOffset: uint64(len(tb.stored)), CompressedSize: uint32(len(stored)),
			UncompressedOffset: uoff, UncompressedSize: uint32(size),
		}
		if len(stored) != size {
			c.Flags = rafs.ChunkFlagCompressed
		}
		tb.chunks = append(tb.chunks, c)
		tb.stored = append(tb.stored, stored...)
		for uint64(len(tb.plain)) < uoff {
			tb.plain = append(tb.plain, 0)
		}
		tb.plain = append(tb.plain, data...)
		digest := dig.Sum(data)
		tb.table = append(tb.table, rafs.ChunkInfo{
			Digest: digest, Flags: c.Flags, CompressedSize: c.CompressedSize, UncompressedSize: c.UncompressedSize,
			CompressedOffset: c.CompressedOffset, UncompressedOffset: c.UncompressedOffset, Index: uint32(i),
		})
		uoff = (uoff + uint64(size) + 4095) &^ 4095
	}
	for uint64(len(tb.plain)) < uoff {
		tb.plain = append(tb.plain, 0)
	}
	// Chunk-info array (v1, uncompressed) and its 4 KiB header.
	ci := make([]byte, n*rafs.CIv1EntrySize)
	for i, c := range tb.chunks {
		if err := rafs.EncodeCIv1(ci[i*rafs.CIv1EntrySize:], c); err != nil {
			t.Fatal(err)
		}
	}
	e := &tb.entry
	e.ChunkSize = uint32(chunkSize)
	e.ChunkCount = uint32(n)
	e.Compressor = comp
	e.Digester = dig
	e.Features = rafs.BlobFeatureAligned
	e.UncompressedSize = uoff
	e.CIOffset = uint64(len(tb.stored))
	e.CICompressor = rafs.CompressNone
	e.CICompressedSize = uint64(len(ci))
	e.CIUncompressedSize = uint64(len(ci))
	tb.stored = append(tb.stored, ci...)
	h := rafs.BlobMetaHeader{
		Magic: rafs.BlobMetaMagic, Magic2: rafs.BlobMetaMagic, Features: e.Features, CICompressor: e.CICompressor,
		CIEntries: e.ChunkCount, CIOffset: e.CIOffset, CICompressedSize: e.CICompressedSize, CIUncompressedSize: e.CIUncompressedSize,
	}
	hb := make([]byte, rafs.BlobMetaHeaderSize)
	h.Encode(hb)
	tb.stored = append(tb.stored, hb...)
	e.CompressedSize = uint64(len(tb.stored))
	sum := sha256.Sum256(tb.stored)
	copy(e.BlobID[:], hex.EncodeToString(sum[:]))
	return tb
}

// makeTarfsBlob is a tarfs-style blob: the stored bytes are the space.
func makeTarfsBlob(size int, seed uint64) *testBlob {
	rng := rand.New(rand.NewPCG(seed, 9))
	tb := &testBlob{stored: make([]byte, size)}
	for i := range tb.stored {
		tb.stored[i] = byte(rng.Uint32())
	}
	tb.plain = tb.stored
	e := &tb.entry
	e.Features = rafs.BlobFeatureTarfs | rafs.BlobFeatureCapTarTOC
	e.Compressor = rafs.CompressNone
	e.Digester = rafs.DigestSHA256
	e.ChunkSize = 1 << 20
	e.CompressedSize = uint64(size)
	e.UncompressedSize = uint64(size)
	sum := sha256.Sum256(tb.stored)
	copy(e.BlobID[:], hex.EncodeToString(sum[:]))
	return tb
}

// memBackend serves stored bytes from memory, counting reads, with an
// optional hook that may fail or alter a read.
type memBackend struct {
	data  []byte
	reads atomic.Int64
	bytes atomic.Int64

	mu   sync.Mutex
	hook func(p []byte, off int64) error // called after the copy
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	m.reads.Add(1)
	if off < 0 || off > int64(len(m.data)) {
		return 0, fmt.Errorf("memBackend: offset %d", off)
	}
	n := copy(p, m.data[off:])
	m.bytes.Add(int64(n))
	m.mu.Lock()
	hook := m.hook
	m.mu.Unlock()
	if hook != nil {
		if err := hook(p[:n], off); err != nil {
			return 0, err
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memBackend) Size(context.Context) (int64, error) { return int64(len(m.data)), nil }

func (m *memBackend) setHook(h func(p []byte, off int64) error) {
	m.mu.Lock()
	m.hook = h
	m.mu.Unlock()
}

// countingBackend wraps a backend and counts its reads.
type countingBackend struct {
	blobcache.Backend
	reads, bytes atomic.Int64
}

func (c *countingBackend) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := c.Backend.ReadAt(ctx, p, off)
	c.reads.Add(1)
	c.bytes.Add(int64(n))
	return n, err
}

func (c *countingBackend) Close() error {
	if cl, ok := c.Backend.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

func sha256hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// readAll reads the whole space of r in pieces of step bytes.
func readAll(t testing.TB, r io.ReaderAt, size int64, step int) []byte {
	t.Helper()
	out := make([]byte, size)
	for off := int64(0); off < size; off += int64(step) {
		n := min(int64(step), size-off)
		if _, err := r.ReadAt(out[off:off+n], off); err != nil {
			t.Fatalf("ReadAt(%d, +%d): %v", off, n, err)
		}
	}
	return out
}

func openCache(t testing.TB, dir string, opts *blobcache.Options) *blobcache.Cache {
	t.Helper()
	c, err := blobcache.Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// backendStore is a Store of one backend, whatever the id: for tests that
// build the backend themselves.
type backendStore struct{ be blobcache.Backend }

func (s backendStore) Open(context.Context, string) (blobcache.Backend, error) { return s.be, nil }

// plainSpace is the reference uncompressed space of a blob: every chunk
// decompressed at its uncompressed offset, zeros between, no cache.
func plainSpace(t testing.TB, stored []byte, e *rafs.BlobEntry, chunks []rafs.BlobChunk) []byte {
	t.Helper()
	space := make([]byte, e.UncompressedSize)
	for i, c := range chunks {
		data := stored[c.CompressedOffset : c.CompressedOffset+uint64(c.CompressedSize)]
		if c.Compressed() {
			plain := make([]byte, c.UncompressedSize)
			if err := rafs.Decompress(e.Compressor, plain, data); err != nil {
				t.Fatalf("chunk %d: %v", i, err)
			}
			data = plain
		}
		copy(space[c.UncompressedOffset:], data)
	}
	return space
}
