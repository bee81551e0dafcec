package oci

import (
	"context"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// An index with a prefetch list is another index than one without, the
// reader takes the newest and its list; a list naming a missing path is
// refused by index; the artifact is read from the cache directory on the
// second open.
func TestIndexPrefetchAndArtifactCache(t *testing.T) {
	img, _ := ociTestImage(t)
	ref := "oci:" + writeLayout(t, filepath.Join(t.TempDir(), "layout"), "v1", img) + ":v1"
	ctx := context.Background()
	if _, err := Index(ctx, ref, IndexOptions{TempDir: t.TempDir(), Prefetch: &IndexPrefetch{Files: []string{"/no/such"}}}); err == nil ||
		!strings.Contains(err.Error(), `prefetch file "/no/such"`) {
		t.Fatalf("index with a missing prefetch file: %v", err)
	}
	plain, err := Index(ctx, ref, IndexOptions{TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	pf := &IndexPrefetch{Files: []string{"/"}, Ranges: []DeviceRange{{Off: 4096, Len: 8192}}}
	listed, err := Index(ctx, ref, IndexOptions{TempDir: t.TempDir(), Prefetch: pf})
	if err != nil {
		t.Fatal(err)
	}
	if listed.Reused || listed.ArtifactDigest == plain.ArtifactDigest || listed.RootHash != plain.RootHash {
		t.Fatalf("index with a prefetch list: %+v; without: %+v", listed, plain)
	}
	cache := t.TempDir()
	for i, wantFetched := range []bool{true, false} {
		ii, err := OpenIndexed(ctx, ref, OpenIndexOptions{CacheDir: cache})
		if err != nil {
			t.Fatal(err)
		}
		ii.Close()
		if ii.ArtifactDigest != listed.ArtifactDigest || !reflect.DeepEqual(ii.Prefetch, *pf) {
			t.Fatalf("open %d: index %s with prefetch %+v, want the newest %s with %+v", i, ii.ArtifactDigest, ii.Prefetch, listed.ArtifactDigest, pf)
		}
		if (ii.ArtifactFetched > 0) != wantFetched {
			t.Fatalf("open %d: %d bytes of the artifact fetched (cached: %v)", i, ii.ArtifactFetched, !wantFetched)
		}
	}
}
