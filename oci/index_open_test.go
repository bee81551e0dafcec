package oci

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/verity"
)

// composeIndexed composes the device of an indexed image through a
// memory cache and checks its bootstrap.
func composeIndexed(t *testing.T, ii *IndexedImage) *blockdev.Image {
	t.Helper()
	ctx := context.Background()
	c, err := blobcache.OpenMemory(nil)
	if err != nil {
		t.Fatal(err)
	}
	ri, err := rafs.NewImage(bytes.NewReader(ii.Bootstrap), int64(len(ii.Bootstrap)))
	if err != nil {
		t.Fatal(err)
	}
	img, err := blockdev.OpenRafs(ctx, ri, blockdev.CachedBlobs{Cache: c, Store: ii.Store()})
	if err != nil {
		t.Fatal(err)
	}
	img.AddCloser(ii)
	img.AddCloser(c)
	t.Cleanup(func() { img.Close() })
	if err := ii.Verity.CheckBootstrap(ctx, img.Composed); err != nil {
		t.Fatal(err)
	}
	return img
}

// The device composed lazily from the index (layers read by range from
// the registry, checked against the tree) is byte for byte the disk
// convert --export image writes, for both verity compats, from a
// registry (fallback tag) and from a layout.
func TestOpenIndexedEqualsConvert(t *testing.T) {
	addr := testregistry.Start(t)
	img, _ := ociTestImage(t)
	ref := addr + "/lazy/img:v1"
	pushImage(t, ref, img)
	dir := writeLayout(t, t.TempDir()+"/layout", "v1", img)
	for _, r := range []string{ref, "oci:" + dir + ":v1"} {
		for _, compat := range []verity.Compat{verity.Standard, verity.NydusCompat} {
			t.Run(fmt.Sprintf("%s/%s", strings.SplitN(r, ":", 2)[0], compat), func(t *testing.T) {
				res := convertT(t, r, Options{CacheDir: t.TempDir(), Insecure: true, Export: ExportImage, Verity: true, VerityCompat: compat})
				want, err := os.ReadFile(res.Exports[0].Path)
				if err != nil {
					t.Fatal(err)
				}
				idx, err := Index(context.Background(), r, IndexOptions{Insecure: true, VerityCompat: compat, TempDir: t.TempDir()})
				if err != nil {
					t.Fatal(err)
				}
				ii, err := OpenIndexed(context.Background(), r, OpenIndexOptions{Insecure: true, RootHash: idx.RootHash})
				if err != nil {
					t.Fatal(err)
				}
				if ii.RootHash != res.Exports[0].RootHash {
					t.Fatalf("root %s, convert's %s", ii.RootHash, res.Exports[0].RootHash)
				}
				checkIndexedDevice(t, ii, want)
			})
		}
	}
}

// An index changed after it was published (a forged one, consistent in
// itself, replacing it behind the fallback tag) is refused when the root
// hash is pinned; without a pin it opens, and the device group it lies
// about reads as an error, never as its bytes.
func TestOpenIndexedForgedRefused(t *testing.T) {
	addr := testregistry.Start(t)
	img, _ := ociTestImage(t)
	ref := addr + "/forge/img:v1"
	pushImage(t, ref, img)
	ctx := context.Background()
	idx, err := Index(ctx, ref, IndexOptions{Insecure: true, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	// Forge: the last level-1 digest changed, the root recomputed.
	r, err := parseRegistryRef(addr+"/forge/img@"+idx.ArtifactDigest, true)
	if err != nil {
		t.Fatal(err)
	}
	art, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := art.Manifest()
	var blobs []artifactBlob
	for i, l := range m.Layers {
		lr, _ := art.LayerByDigest(l.Digest)
		rc, _ := lr.Compressed()
		b, _ := readLimited(rc, 1<<30)
		rc.Close()
		if i == 1 {
			b[len(b)-1] ^= 1
		}
		blobs = append(blobs, artifactBlob{mt: string(l.MediaType), data: b})
	}
	var cfg IndexConfig
	rawCfg, _ := art.RawConfigFile()
	json.Unmarshal(rawCfg, &cfg)
	cfg.Verity.RootHash = hex.EncodeToString(rootOf(blobs[1].data, make([]byte, sha256.Size)))
	rawCfg, _ = json.Marshal(cfg)
	src, err := openSource(ctx, ref, sourceOptions{insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := newPublisher(src, IndexOptions{})
	forged, err := pub.publish(ctx, *m.Subject, rawCfg, blobs)
	if err != nil {
		t.Fatal(err)
	}
	// Only the forged index behind the fallback tag.
	fallback, _ := parseRegistryRef(fmt.Sprintf("%s/forge/img:sha256-%s", addr, m.Subject.Digest.Hex), true)
	fd, _ := v1.NewHash(forged.digest)
	one := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Manifests: []v1.Descriptor{{
		MediaType: types.OCIManifestSchema1, Digest: fd, Size: forged.size, ArtifactType: IndexArtifactType}}}
	rawIdx, _ := json.Marshal(one)
	if err := remote.Put(fallback, rawIndex{rawIdx}); err != nil {
		t.Fatal(err)
	}

	_, err = OpenIndexed(ctx, ref, OpenIndexOptions{Insecure: true, RootHash: idx.RootHash})
	if err == nil || !strings.Contains(err.Error(), "no usable index with root hash "+idx.RootHash) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("forged index with the root pinned: %v", err)
	}
	t.Logf("pinned: %v", err)
	ii, err := OpenIndexed(ctx, ref, OpenIndexOptions{Insecure: true})
	if err != nil {
		t.Fatal(err)
	}
	dev := composeIndexed(t, ii)
	last := (dev.Size() - 1) / blobcache.VerityGroupSize * blobcache.VerityGroupSize
	if _, err := dev.ReadAt(make([]byte, dev.Size()-last), last); err == nil {
		t.Fatal("the group the forged index lies about was served")
	}
	if _, err := dev.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("the rest of the device: %v", err)
	}
}

type rawIndex struct{ raw []byte }

func (r rawIndex) RawManifest() ([]byte, error)        { return r.raw, nil }
func (r rawIndex) MediaType() (types.MediaType, error) { return types.OCIImageIndex, nil }

// checkIndexedDevice reads every byte of the device composed from ii and
// compares it with want, convert's disk of the same image (which may
// carry the verity tree after the data).
func checkIndexedDevice(t *testing.T, ii *IndexedImage, want []byte) {
	t.Helper()
	dev := composeIndexed(t, ii)
	got := make([]byte, dev.Size())
	if _, err := dev.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if int64(len(want)) < dev.Size() || !bytes.Equal(got, want[:dev.Size()]) {
		t.Fatalf("lazy device (%d bytes) differs from convert's disk (%d bytes)", dev.Size(), len(want))
	}
}
