package blobcache_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Golden values of shared/fixtures/nydus/README.md.
const (
	fixtureBlobID     = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	fixtureSpaceSHA   = "66c3387eb172d604c659d25771cf8979953613d89970f66264d435dbbc17c763"
	fixtureLibRsSHA   = "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69"
	fixtureSyncIoSHA  = "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96"
	fixtureSpaceBytes = 36864
)

func openFixture(t *testing.T) (*rafs.Image, *localfs.Store) {
	t.Helper()
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	blob := testutil.NydusFixture(t, fixtureBlobID)
	img, err := rafs.Open(boot)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	if len(img.Blobs) != 1 || img.Blobs[0].ID() != fixtureBlobID {
		t.Fatalf("fixture bootstrap names blobs %v", img.Blobs)
	}
	return img, localfs.New(filepath.Dir(blob))
}

func openCounted(t *testing.T, store blobcache.Store, id string) *countingBackend {
	t.Helper()
	be, err := store.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return &countingBackend{Backend: be}
}

// TestNydusFixture reads the real nydus blob through the cache: golden
// hashes of the whole space and of both files, digests from the bootstrap
// chunk table, and a restart that fetches nothing.
func TestNydusFixture(t *testing.T) {
	img, store := openFixture(t)
	dir := t.TempDir()
	ctx := context.Background()

	cache := openCache(t, dir, nil)
	be := openCounted(t, store, fixtureBlobID)
	blob, err := cache.OpenBlob(ctx, backendStore{be}, &img.Blobs[0], img.ChunkTable)
	if err != nil {
		t.Fatal(err)
	}
	if blob.Size() != fixtureSpaceBytes {
		t.Fatalf("Size %d, want %d", blob.Size(), fixtureSpaceBytes)
	}
	metaReads := be.reads.Load()
	if metaReads == 0 {
		t.Fatal("opening read nothing from the backend: where did the chunk-info array come from?")
	}

	// Files first, each touching one chunk: exactly one backend read each.
	lib := make([]byte, 16931)
	if _, err := blob.ReadAt(lib, 0); err != nil {
		t.Fatal(err)
	}
	if got := sha256hex(lib); got != fixtureLibRsSHA {
		t.Errorf("lib.rs sha256 %s, want %s", got, fixtureLibRsSHA)
	}
	if got := be.reads.Load() - metaReads; got != 1 {
		t.Errorf("reading lib.rs took %d backend reads, want 1", got)
	}
	syncIO := make([]byte, 13400)
	if _, err := blob.ReadAt(syncIO, 20480); err != nil {
		t.Fatal(err)
	}
	if got := sha256hex(syncIO); got != fixtureSyncIoSHA {
		t.Errorf("sync_io.rs sha256 %s, want %s", got, fixtureSyncIoSHA)
	}
	all := readAll(t, blob, blob.Size(), 4096)
	if got := sha256hex(all); got != fixtureSpaceSHA {
		t.Errorf("uncompressed space sha256 %s, want %s", got, fixtureSpaceSHA)
	}
	st := blob.Stats()
	if st.Units != 2 || st.ReadyUnits != 2 || st.BackendReads != 2 || st.DigestErrors != 0 {
		t.Errorf("stats %+v, want 2 units ready after 2 fetches", st)
	}
	fetched := be.reads.Load()
	t.Logf("first run: %d backend reads (%d for the layout), %d bytes", fetched, metaReads, be.bytes.Load())
	if err := blob.Close(); err != nil {
		t.Fatal(err)
	}
	if err := cache.Close(); err != nil {
		t.Fatal(err)
	}

	// Restart: a new Cache on the same directory serves everything without
	// a single backend read, layout included.
	cache2 := openCache(t, dir, nil)
	be2 := openCounted(t, store, fixtureBlobID)
	blob2, err := cache2.OpenBlob(ctx, backendStore{be2}, &img.Blobs[0], img.ChunkTable)
	if err != nil {
		t.Fatal(err)
	}
	defer blob2.Close()
	all2 := readAll(t, blob2, blob2.Size(), 8192)
	if got := sha256hex(all2); got != fixtureSpaceSHA {
		t.Errorf("after restart: sha256 %s, want %s", got, fixtureSpaceSHA)
	}
	if n := be2.reads.Load(); n != 0 {
		t.Errorf("after restart: %d backend reads, want 0", n)
	}
	if st := blob2.Stats(); st.ReadyUnits != 2 {
		t.Errorf("after restart: %d ready units, want 2", st.ReadyUnits)
	}
}

// TestNydusFixtureDigestsChecked makes sure the bootstrap's digests are
// really what decides: one wrong digest in the chunk table fails exactly
// that chunk, with ErrDigestMismatch, and the other keeps working.
func TestNydusFixtureDigestsChecked(t *testing.T) {
	img, store := openFixture(t)
	table := append([]rafs.ChunkInfo(nil), img.ChunkTable...)
	var bad *rafs.ChunkInfo
	for i := range table {
		if table[i].Index == 1 {
			bad = &table[i]
		}
	}
	if bad == nil || len(table) != 2 {
		t.Fatalf("fixture chunk table %+v", table)
	}
	bad.Digest[0] ^= 1
	cache := openCache(t, t.TempDir(), nil)
	blob, err := cache.OpenBlob(context.Background(), backendStore{openCounted(t, store, fixtureBlobID)}, &img.Blobs[0], table)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	p := make([]byte, 4096)
	if _, err := blob.ReadAt(p, 20480); !errors.Is(err, blobcache.ErrDigestMismatch) {
		t.Fatalf("read of the chunk with a wrong digest: %v, want ErrDigestMismatch", err)
	}
	if _, err := blob.ReadAt(p, 0); err != nil {
		t.Fatalf("read of the good chunk: %v", err)
	}
	if st := blob.Stats(); st.ReadyUnits != 1 || st.DigestErrors != 2 { // two attempts
		t.Errorf("stats %+v, want 1 ready unit and 2 digest errors", st)
	}
}

// TestNydusFixtureInlineDigests uses the blob's own digest section (found
// through its ToC, which the blob table's ToC digest vouches for) when the
// bootstrap chunk table has nothing.
func TestNydusFixtureInlineDigests(t *testing.T) {
	img, store := openFixture(t)
	cache := openCache(t, t.TempDir(), nil)
	blob, err := cache.OpenBlob(context.Background(), backendStore{openCounted(t, store, fixtureBlobID)}, &img.Blobs[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := sha256hex(readAll(t, blob, blob.Size(), 36864)); got != fixtureSpaceSHA {
		t.Errorf("sha256 %s, want %s", got, fixtureSpaceSHA)
	}
	blob.Close()

	// A blob entry whose ToC digest does not match refuses to open.
	e := img.Blobs[0]
	e.TOCDigest[5] ^= 0x40
	_, err = cache.OpenBlob(context.Background(), backendStore{openCounted(t, store, fixtureBlobID)}, &e, nil)
	if err == nil {
		t.Fatal("blob with a wrong ToC digest opened")
	}
	t.Logf("wrong ToC digest: %v", err)
}
