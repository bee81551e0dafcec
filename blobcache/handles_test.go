package blobcache_test

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// A memory-only cache serves the same bytes as a disk cache, keeps no more
// than its limit, and checks every chunk: a changed stored byte fails the
// reads of that chunk (ErrDigestMismatch), others still read.
func TestMemoryCacheVerifies(t *testing.T) {
	tb := makeBlob(t, rafs.CompressNone, rafs.DigestSHA256, 40, 16<<10, 3)
	cache, err := blobcache.OpenMemory(&blobcache.Options{MemoryLimit: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	h, err := cache.OpenBlob(context.Background(), backendStore{&memBackend{data: tb.stored}}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, h, h.Size(), 40<<10); !bytes.Equal(got, tb.plain) {
		t.Fatal("memory cache: uncompressed space differs")
	}
	if st := cache.Stats(); st.MemoryBytes > 64<<10 {
		t.Errorf("memory cache keeps %d bytes, limit %d", st.MemoryBytes, 64<<10)
	}
	h.Close()

	bad := bytes.Clone(tb.stored)
	c := tb.chunks[5]
	bad[c.CompressedOffset+uint64(c.CompressedSize)/2] ^= 1
	h, err = cache.OpenBlob(context.Background(), backendStore{&memBackend{data: bad}}, &tb.entry, tb.table)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	p := make([]byte, c.UncompressedSize)
	if _, err := h.ReadAt(p, int64(c.UncompressedOffset)); !errors.Is(err, blobcache.ErrDigestMismatch) {
		t.Errorf("read of a changed chunk: %v, want ErrDigestMismatch", err)
	}
	o := tb.chunks[6]
	p = make([]byte, o.UncompressedSize)
	if _, err := h.ReadAt(p, int64(o.UncompressedOffset)); err != nil || !bytes.Equal(p, tb.plain[o.UncompressedOffset:o.UncompressedOffset+uint64(o.UncompressedSize)]) {
		t.Errorf("read of an intact chunk: %v", err)
	}
}

// Opening an open blob id shares it: one open, one backend, closed with
// the last Handle; a closed Handle fails its reads while the others go on;
// an opener whose chunk table disagrees is refused.
func TestSharedOpen(t *testing.T) {
	for _, memory := range []bool{false, true} {
		tb := makeBlob(t, rafs.CompressZstd, rafs.DigestBlake3, 8, 16<<10, 4)
		var cache *blobcache.Cache
		if memory {
			var err error
			if cache, err = blobcache.OpenMemory(nil); err != nil {
				t.Fatal(err)
			}
			defer cache.Close()
		} else {
			cache = openCache(t, t.TempDir(), nil)
		}
		ctx := context.Background()
		a, err := cache.OpenBlob(ctx, backendStore{&memBackend{data: tb.stored}}, &tb.entry, tb.table)
		if err != nil {
			t.Fatal(err)
		}
		b, err := cache.OpenBlob(ctx, backendStore{nil}, &tb.entry, tb.table) // store not asked
		if err != nil {
			t.Fatal(err)
		}
		if st := cache.Stats(); st.Opens != 1 || st.OpenBlobs != 1 || st.Handles != 2 {
			t.Errorf("memory %v: two opens: %+v", memory, st)
		}
		other := append([]rafs.ChunkInfo(nil), tb.table...)
		other[0].Digest[0] ^= 1
		if _, err := cache.OpenBlob(ctx, backendStore{nil}, &tb.entry, other); err == nil {
			t.Errorf("memory %v: an opener with other digests shared the blob", memory)
		}
		a.Close()
		if _, err := a.ReadAt(make([]byte, 1), 0); !errors.Is(err, blobcache.ErrClosed) {
			t.Errorf("memory %v: read of a closed handle: %v", memory, err)
		}
		if got := readAll(t, b, b.Size(), 8<<10); !bytes.Equal(got, tb.plain) {
			t.Errorf("memory %v: the remaining handle reads other bytes", memory)
		}
		b.Close()
		if st := cache.Stats(); st.OpenBlobs != 0 || st.Handles != 0 {
			t.Errorf("memory %v: after the last close: %+v", memory, st)
		}
		c, err := cache.OpenBlob(ctx, backendStore{&memBackend{data: tb.stored}}, &tb.entry, tb.table)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if st := cache.Stats(); st.Opens != 2 {
			t.Errorf("memory %v: reopen after close: %+v, want a second open", memory, st)
		}
	}
}
