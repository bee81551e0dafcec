package oci

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/verity"
)

// convertRoot is the root hash convert --export image --verity prints.
func convertRoot(t *testing.T, ref string, compat verity.Compat) string {
	t.Helper()
	res := convertT(t, ref, Options{CacheDir: t.TempDir(), Export: ExportImage, Verity: true, VerityCompat: compat})
	if len(res.Exports) != 1 || res.Exports[0].RootHash == "" {
		t.Fatalf("convert: exports %+v", res.Exports)
	}
	return res.Exports[0].RootHash
}

// The index's root hash is convert's for the same image (whiteouts, opaque
// dirs, hardlinks, xattrs, gzip and uncompressed layers); the artifact
// lands in the layout, and a second index is a no-op.
func TestIndexLayoutMatchesConvert(t *testing.T) {
	img, _ := ociTestImage(t)
	dir := writeLayout(t, filepath.Join(t.TempDir(), "layout"), "v1", img)
	ref := "oci:" + dir + ":v1"
	for _, compat := range []verity.Compat{verity.Standard, verity.NydusCompat} {
		t.Run(compat.String(), func(t *testing.T) {
			want := convertRoot(t, ref, compat)
			res, err := Index(context.Background(), ref, IndexOptions{VerityCompat: compat, TempDir: t.TempDir()})
			if err != nil {
				t.Fatal(err)
			}
			if res.Reused {
				t.Fatal("first index reported as reused")
			}
			if res.RootHash != want {
				t.Fatalf("index root %s, convert's %s", res.RootHash, want)
			}
		})
	}
	again, err := Index(context.Background(), ref, IndexOptions{TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if !again.Reused {
		t.Fatal("second index not a no-op")
	}
	lp, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	ii, _ := lp.ImageIndex()
	im, _ := ii.IndexManifest()
	n := 0
	for _, d := range im.Manifests {
		if d.ArtifactType == IndexArtifactType {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d index artifacts in the layout, want 2 (one per verity compat)", n)
	}
}

// Pushed to a registry without the referrers API (Debian's
// docker-registry): found again through the sha256-<hex> fallback tag.
func TestIndexRegistryFallbackTag(t *testing.T) {
	addr := testregistry.Start(t)
	img, _ := ociTestImage(t)
	ref := addr + "/idx/img:v1"
	pushImage(t, ref, img)
	want := convertRoot(t, ref, verity.Standard)
	opts := IndexOptions{Insecure: true, TempDir: t.TempDir()}
	res, err := Index(context.Background(), ref, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Reused || res.RootHash != want {
		t.Fatalf("index: reused %v root %s, convert's %s", res.Reused, res.RootHash, want)
	}
	t.Logf("artifact %s: %d bytes for %d bytes of layers (%.1f%%)", res.ArtifactDigest, res.ArtifactSize, res.ImageSize, 100*float64(res.ArtifactSize)/float64(res.ImageSize))
	d := digestOf(t, img)
	tag := fmt.Sprintf("%s/idx/img:sha256-%s", addr, d.Hex)
	r, err := parseRegistryRef(tag, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := remote.Index(r); err != nil {
		t.Fatalf("fallback tag %s: %v", tag, err)
	}
	again, err := Index(context.Background(), ref, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Reused || again.ArtifactDigest != res.ArtifactDigest || again.RootHash != want {
		t.Fatalf("second index: %+v", again)
	}
}
