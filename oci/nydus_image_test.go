package oci

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

const (
	nydusFixtureBoot   = "rafs-v6-2.2.boot"
	nydusFixtureBlobID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	// The flat device's sha256 from the fixture README.
	nydusFixtureDevice = "817ff91aaaabde208168c2086395e3dbd75d89239d3ef79a84302aa38b2bf2e6"
)

// The real nydus bootstrap and its blob (whose id is not its sha256),
// published as a nydus image into a layout: OpenNydus finds the blob by
// the blob-id annotation, and the composed device is the fixture's.
func TestNydusFixtureLayout(t *testing.T) {
	ctx := context.Background()
	boot, err := os.ReadFile(testutil.NydusFixture(t, nydusFixtureBoot))
	if err != nil {
		t.Fatal(err)
	}
	blob := testutil.NydusFixture(t, nydusFixtureBlobID)
	ref := "oci:" + filepath.Join(t.TempDir(), "layout") + ":v1"
	pub, err := PublishNydus(ctx, ref, nil, []NydusBlobFile{{ID: nydusFixtureBlobID, Path: blob}}, boot, NydusPublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pub.Layers) != 2 || pub.Layers[0].Annotations[NydusBlobIDAnnotation] != nydusFixtureBlobID || pub.Layers[0].Digest.Hex == nydusFixtureBlobID {
		t.Fatalf("layers %+v: want the blob (by digest, annotated with its id) and the bootstrap", pub.Layers)
	}
	ni, err := OpenNydus(ctx, ref, OpenNydusOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if string(ni.Bootstrap) != string(boot) || ni.ManifestDigest != pub.ManifestDigest || len(ni.Blobs) != 1 || ni.Blobs[0].Digest != pub.Layers[0].Digest.String() {
		t.Fatalf("OpenNydus: manifest %s, %d blobs %+v", ni.ManifestDigest, len(ni.Blobs), ni.Blobs)
	}
	if got := composeSHA256(t, ni); got != nydusFixtureDevice {
		t.Fatalf("device sha256 %s, the fixture README's is %s", got, nydusFixtureDevice)
	}
}

// composeSHA256 composes a nydus image over a memory cache and hashes
// the flat device.
func composeSHA256(t *testing.T, ni *NydusImage) string {
	t.Helper()
	ctx := context.Background()
	cache, err := blobcache.OpenMemory(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	ri, err := rafs.NewImage(strings.NewReader(string(ni.Bootstrap)), int64(len(ni.Bootstrap)))
	if err != nil {
		t.Fatal(err)
	}
	img, err := blockdev.OpenRafs(ctx, ri, blockdev.CachedBlobs{Cache: cache, Store: ni.Store()})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(img.Composed, 0, img.Size())); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// An image without a nydus bootstrap layer is ErrNotNydus (the caller
// reads it another way); a bootstrap layer changed in the layout is
// refused by its digest.
func TestNydusNotNydusAndChangedBootstrap(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	src := "oci:" + writeLayout(t, filepath.Join(dir, "plain"), "v1", newImage(t, newLayer(t, makeTar(t, tFile("a", "b")), "gzip"))) + ":v1"
	if _, err := OpenNydus(ctx, src, OpenNydusOptions{}); !errors.Is(err, ErrNotNydus) {
		t.Fatalf("plain image: %v, want ErrNotNydus", err)
	}
	boot, err := os.ReadFile(testutil.NydusFixture(t, nydusFixtureBoot))
	if err != nil {
		t.Fatal(err)
	}
	ref := "oci:" + filepath.Join(dir, "nydus") + ":v1"
	pub, err := PublishNydus(ctx, ref, nil, []NydusBlobFile{{ID: nydusFixtureBlobID, Path: testutil.NydusFixture(t, nydusFixtureBlobID)}}, boot, NydusPublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	bl := filepath.Join(dir, "nydus", "blobs", "sha256", pub.Layers[1].Digest.Hex)
	b, err := os.ReadFile(bl)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	if err := os.WriteFile(bl, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenNydus(ctx, ref, OpenNydusOptions{}); err == nil || !strings.Contains(err.Error(), "changed") {
		t.Fatalf("changed bootstrap layer: %v", err)
	}
}
