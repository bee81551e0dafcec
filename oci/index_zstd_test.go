package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/verity"
)

// zstdFramedLayer compresses a tar in zstd frames of frame bytes of tar
// each, one after the other (as zstd:chunked-like writers do).
func zstdFramedLayer(t testing.TB, tarBytes []byte, frame int) *memLayer {
	t.Helper()
	e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	var blob []byte
	for off := 0; off < len(tarBytes); off += frame {
		blob = e.EncodeAll(tarBytes[off:min(off+frame, len(tarBytes))], blob)
	}
	return &memLayer{blob: blob, tar: tarBytes, mt: types.OCILayerZStd, digest: sha256Hash(blob), diffID: sha256Hash(tarBytes)}
}

// An image with zstd layers of many frames (and of one frame smaller than
// a span), gzip layers and whiteouts is indexed with a 64 KiB span; read
// lazily, its device is convert's disk byte for byte, and its root hash
// convert's.
func TestIndexZstdLayersEqualConvert(t *testing.T) {
	tars := ociTestLayers(t)
	img := newImage(t,
		zstdFramedLayer(t, tars[0], 256<<10), // 3.2 MB: 13 frames
		newLayer(t, tars[1], "gzip"),
		zstdFramedLayer(t, tars[2], 256<<10), // one frame, smaller than the span
		newLayer(t, tars[3], "gzip"),
	)
	dir := writeLayout(t, filepath.Join(t.TempDir(), "layout"), "v1", img)
	ref := "oci:" + dir + ":v1"
	ctx := context.Background()
	res := convertT(t, ref, Options{CacheDir: t.TempDir(), Export: ExportImage, Verity: true})
	want, err := os.ReadFile(res.Exports[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := Index(ctx, ref, IndexOptions{Span: 64 << 10, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if idx.RootHash != res.Exports[0].RootHash {
		t.Fatalf("index root %s, convert's %s", idx.RootHash, res.Exports[0].RootHash)
	}
	ii, err := OpenIndexed(ctx, ref, OpenIndexOptions{RootHash: idx.RootHash})
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 2} {
		if l := ii.Layers[i]; l.MediaType != string(types.OCILayerZStd) || l.Table < 2 || l.Windows != -1 {
			t.Fatalf("layer %d in the index: %+v", i, l)
		}
	}
	checkZstdTables(t, dir, idx.ArtifactDigest, ii.Layers)
	checkIndexedDevice(t, ii, want)
}

// checkZstdTables checks that the artifact's blobs the zstd layers name
// are zstd tables.
func checkZstdTables(t *testing.T, dir, artifact string, layers []IndexLayer) {
	t.Helper()
	lp, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(string(lp), "blobs", strings.Replace(artifact, ":", "/", 1)))
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Layers []struct {
			MediaType string `json:"mediaType"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	for i, l := range layers {
		if l.MediaType == string(types.OCILayerZStd) && m.Layers[l.Table].MediaType != IndexZstdTableType {
			t.Fatalf("layer %d: table %d is a %s", i, l.Table, m.Layers[l.Table].MediaType)
		}
	}
}

// A zstd layer of one frame larger than the span is refused with one
// clear line naming the layer.
func TestIndexZstdOneFrameRefused(t *testing.T) {
	tars := ociTestLayers(t)
	one := newLayer(t, tars[0], "zstd") // klauspost's streaming writer: one frame
	img := newImage(t, newLayer(t, tars[1], "gzip"), one)
	dir := writeLayout(t, filepath.Join(t.TempDir(), "layout"), "v1", img)
	_, err := Index(context.Background(), "oci:"+dir+":v1", IndexOptions{Span: 64 << 10, TempDir: t.TempDir(), VerityCompat: verity.Standard})
	if err == nil {
		t.Fatal("a zstd layer of one frame was indexed")
	}
	msg := err.Error()
	if !strings.Contains(msg, "layer 1 ("+one.digest.String()+"): a zstd layer of one frame cannot be read lazily (recompress it") || strings.Contains(msg, "\n") {
		t.Fatalf("error: %q", msg)
	}
	t.Log(msg)
}

// From a registry, a 4 KiB read in the middle of a zstd layer of 256 KiB
// frames fetches the frames of the spans it needs, not the layer.
func TestOpenIndexedZstdReadsFrames(t *testing.T) {
	addr := testregistry.Start(t)
	rng := rand.New(rand.NewPCG(12, 12))
	noise := make([]byte, 3<<20) // incompressible: frames are their size
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	tarBytes := makeTar(t, tDir("data/", 0o755), tFile("data/noise", string(noise)))
	zl := zstdFramedLayer(t, tarBytes, 256<<10)
	img := newImage(t, newLayer(t, ociTestLayers(t)[3], "gzip"), zl)
	ref := addr + "/zstd/img:v1"
	pushImage(t, ref, img)
	ctx := context.Background()
	idx, err := Index(ctx, ref, IndexOptions{Insecure: true, Span: 64 << 10, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ii, err := OpenIndexed(ctx, ref, OpenIndexOptions{Insecure: true, RootHash: idx.RootHash})
	if err != nil {
		t.Fatal(err)
	}
	dev := composeIndexed(t, ii)
	ri, err := rafs.NewImage(bytes.NewReader(ii.Bootstrap), int64(len(ii.Bootstrap)))
	if err != nil {
		t.Fatal(err)
	}
	defer ri.Close()
	var at int64 = -1
	for i := range ri.Blobs {
		if ri.Blobs[i].ID() == zl.diffID.Hex {
			at = int64(ri.DeviceSlots[i].MappedBlkAddr) * 512
		}
	}
	if at < 0 {
		t.Fatal("the zstd layer is not in the bootstrap")
	}
	before := ii.FetchStats()
	mid := int64(len(tarBytes)/2) / 4096 * 4096
	buf := make([]byte, 4096)
	if _, err := dev.ReadAt(buf, at+mid); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, tarBytes[mid:mid+4096]) {
		t.Fatal("wrong bytes")
	}
	after := ii.FetchStats()
	fetched := after.Bytes - before.Bytes
	// A 64 KiB verity group lies in at most two 256 KiB frames.
	if fetched == 0 || fetched > 2*(256<<10+1024) {
		t.Fatalf("a cold 4 KiB read fetched %d bytes of the %d-byte layer (%d requests)", fetched, len(zl.blob), after.Requests-before.Requests)
	}
	t.Logf("a cold 4 KiB read fetched %d bytes of the %d-byte layer in %d requests", fetched, len(zl.blob), after.Requests-before.Requests)
}
