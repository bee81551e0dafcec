package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// Hostile and broken inputs: each must fail with an error that says what
// is wrong, and leave nothing in the cache that a later run would take as
// done.

// checkNothingDone fails if the cache holds a converted image, a layer
// bootstrap whose tar is not complete, work in progress or temporaries.
func checkNothingDone(t *testing.T, cache string) {
	t.Helper()
	images, _ := filepath.Glob(filepath.Join(cache, "images", "*", "image.json"))
	if len(images) > 0 {
		t.Errorf("a failed conversion left %v", images)
	}
	checkCacheConsistent(t, cache)
}

// checkCacheConsistent fails unless everything published in the cache is
// complete: every layer bootstrap opens and its tar has the bootstrap's
// size and the sha256 it is named by, every image.json names a bootstrap
// that opens; staging holds nothing of a finished run, and no temporary
// is left beside published files.
func checkCacheConsistent(t *testing.T, cache string) {
	t.Helper()
	boots, _ := filepath.Glob(filepath.Join(cache, "layers", "*.boot"))
	for _, b := range boots {
		id := strings.TrimSuffix(filepath.Base(b), ".boot")
		img, err := rafs.Open(b)
		if err != nil {
			t.Errorf("published layer bootstrap %s does not open: %v", b, err)
			continue
		}
		size := img.Blobs[0].CompressedSize
		img.Close()
		tar := filepath.Join(cache, "blobs", id)
		if st, err := os.Stat(tar); err != nil || uint64(st.Size()) != size {
			t.Errorf("layer %s published without its complete tar: %v", id, err)
		} else if got := testutil.FileSHA256(t, tar); got != id {
			t.Errorf("tar %s has sha256 %s", tar, got)
		}
	}
	recs, _ := filepath.Glob(filepath.Join(cache, "images", "*", "image.json"))
	for _, r := range recs {
		rec, err := readRecord(r)
		if err != nil {
			t.Errorf("published %s: %v", r, err)
			continue
		}
		img, err := rafs.Open(filepath.Join(cache, rec.Bootstrap))
		if err != nil {
			t.Errorf("%s names a bootstrap that does not open: %v", r, err)
			continue
		}
		img.Close()
	}
	tars, _ := filepath.Glob(filepath.Join(cache, "blobs", "*"))
	for _, p := range tars {
		if strings.HasSuffix(p, ".disk") || strings.HasPrefix(filepath.Base(p), ".") {
			continue // disks; temporaries (never taken as done)
		}
		if _, err := os.Stat(filepath.Join(cache, "layers", filepath.Base(p)+".boot")); err != nil {
			// A tar without its bootstrap is allowed (the next run
			// checks its sha256 and indexes it), but never a bad one.
			if testutil.FileSHA256(t, p) != filepath.Base(p) {
				t.Errorf("blob %s does not have the sha256 it is named by", p)
			}
		}
	}
}

// expectError converts ref and wants an error containing every part.
func expectError(t *testing.T, ref string, opts Options, parts ...string) error {
	t.Helper()
	_, err := Convert(context.Background(), ref, opts)
	if err == nil {
		t.Fatalf("convert %s succeeded", ref)
	}
	t.Logf("%s: %v", ref, err)
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not contain %q", err, p)
		}
	}
	return err
}

func TestHostileOversizedManifest(t *testing.T) {
	big := bytes.Repeat([]byte(" "), DefaultMaxManifestSize+1)
	copy(big, `{"schemaVersion":2}`)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v2/":
			w.WriteHeader(http.StatusOK)
		case "/v2/big/manifests/sized":
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
			w.Header().Set("Content-Length", fmt.Sprint(len(big)))
			w.Write(big)
		case "/v2/big/manifests/chunked":
			// No Content-Length: the limit must hold while reading.
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
			for off := 0; off < len(big); off += 1 << 20 {
				w.Write(big[off:min(off+1<<20, len(big))])
				w.(http.Flusher).Flush()
			}
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	cache := filepath.Join(t.TempDir(), "cache")
	expectError(t, host+"/big:sized", Options{CacheDir: cache, Insecure: true}, "manifest", "exceed the 8388608-byte limit")
	err := expectError(t, host+"/big:chunked", Options{CacheDir: cache, Insecure: true}, "manifest", "more than 8388608 bytes")
	if !errors.Is(err, errTooLarge) {
		t.Errorf("chunked: %v does not wrap errTooLarge", err)
	}
	checkNothingDone(t, cache)
}

func TestHostileOversizedConfig(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	img := newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip"))
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.Config.Labels = map[string]string{"padding": strings.Repeat("x", DefaultMaxConfigSize)}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		t.Fatal(err)
	}
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "big", img)
	expectError(t, "oci:"+layoutDir+":big", Options{CacheDir: cache}, "config", "over the 8388608-byte limit")

	// A descriptor that lies about the size is caught while reading.
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	m["config"].(map[string]any)["size"] = 1000
	lying, _ := json.Marshal(m)
	writeRawManifest(t, layoutDir, "lying", lying)
	expectError(t, "oci:"+layoutDir+":lying", Options{CacheDir: cache}, "config", "more than 8388608 bytes")
	checkNothingDone(t, cache)
}

// writeRawManifest stores manifest bytes as a blob of the layout and tags
// them in index.json.
func writeRawManifest(t *testing.T, layoutDir, tag string, raw []byte) v1.Hash {
	t.Helper()
	d := sha256Hash(raw)
	if err := os.WriteFile(filepath.Join(layoutDir, "blobs", "sha256", d.Hex), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	idxPath := filepath.Join(layoutDir, "index.json")
	b, err := os.ReadFile(idxPath)
	if err != nil {
		t.Fatal(err)
	}
	var idx v1.IndexManifest
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	idx.Manifests = append(idx.Manifests, v1.Descriptor{MediaType: types.OCIManifestSchema1, Size: int64(len(raw)), Digest: d,
		Annotations: map[string]string{refNameAnnotation: tag}})
	if b, err = json.Marshal(idx); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(idxPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestHostileLayerDigestMismatch(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	good := newLayer(t, makeTar(t, tFile("good", "fine")), "gzip")
	bad := newLayer(t, makeTar(t, tFile("bad", strings.Repeat("payload", 1000))), "gzip")
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "v1", newImage(t, good, bad))
	// Flip a byte of the second layer's blob, keeping its size.
	blob := filepath.Join(layoutDir, "blobs", "sha256", bad.digest.Hex)
	b, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(blob, b, 0o644); err != nil {
		t.Fatal(err)
	}
	expectError(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache, Concurrency: 1},
		"layer 1 ("+bad.digest.String()+")", "content digest sha256:", "does not match the descriptor")
	if _, err := os.Stat(filepath.Join(cache, "blobs", bad.diffID.Hex)); err == nil {
		t.Error("the bad layer's tar was published")
	}
	checkNothingDone(t, cache)

	// Cut short: the size check names it.
	if err := os.WriteFile(blob, b[:len(b)-10], 0o644); err != nil {
		t.Fatal(err)
	}
	expectError(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache}, "layer 1", "bytes")
	// Garbage after a valid gzip stream is not part of the layer.
	withJunk := newLayer(t, makeTar(t, tFile("x", "x")), "gzip")
	withJunk.blob = append(withJunk.blob, "trailing junk"...)
	withJunk.digest = sha256Hash(withJunk.blob)
	writeLayout(t, layoutDir, "junk", newImage(t, withJunk))
	expectError(t, "oci:"+layoutDir+":junk", Options{CacheDir: cache}, "layer 0")
	checkNothingDone(t, cache)
}

// TestHostileRegistryCorruption: a registry serving bytes that are not the
// blob it names (storage corrupted behind its back).
func TestHostileRegistryCorruption(t *testing.T) {
	reg, storage := testregistry.StartDir(t)
	layer := newLayer(t, makeTar(t, tFile("data", strings.Repeat("registry", 5000))), "gzip")
	ref := reg + "/corrupt/img:v1"
	pushImage(t, ref, newImage(t, layer))
	// docker-registry stores blobs as .../blobs/sha256/<2 hex>/<hex>/data.
	var data []string
	filepath.Walk(storage, func(p string, info os.FileInfo, err error) error {
		if err == nil && strings.HasSuffix(p, filepath.Join(layer.digest.Hex, "data")) {
			data = append(data, p)
		}
		return nil
	})
	if len(data) != 1 {
		t.Fatalf("layer blob not found in the registry's storage: %v", data)
	}
	b, _ := os.ReadFile(data[0])
	b[len(b)-20] ^= 1
	if err := os.WriteFile(data[0], b, 0o644); err != nil {
		t.Fatal(err)
	}
	cache := filepath.Join(t.TempDir(), "cache")
	expectError(t, ref, Options{CacheDir: cache, Insecure: true}, "layer 0", "does not match")
	checkNothingDone(t, cache)
}

func TestHostileDiffID(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	l := newLayer(t, makeTar(t, tFile("a", "real")), "gzip")
	l.diffID = sha256Hash([]byte("something else"))
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "v1", newImage(t, l))
	expectError(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache}, "does not match the config's diff_id "+l.diffID.String())
	checkNothingDone(t, cache)
}

func TestHostilePaths(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	layoutDir := filepath.Join(dir, "layout")
	for i, name := range []string{"../../escape", "a/../../escape", "/../escape"} {
		climb := newLayer(t, makeTar(t, tFile("ok", "ok"), tFile(name, "x")), "gzip")
		tag := fmt.Sprint("climb", i)
		writeLayout(t, layoutDir, tag, newImage(t, climb))
		expectError(t, "oci:"+layoutDir+":"+tag, Options{CacheDir: cache}, "layer 0", `"`+name+`"`, "escapes the root")
	}

	through := newLayer(t, makeTar(t, tSymlink("lnk", "/etc"), tFile("lnk/passwd", "owned")), "gzip")
	writeLayout(t, layoutDir, "through", newImage(t, through))
	expectError(t, "oci:"+layoutDir+":through", Options{CacheDir: cache}, "layer 0", "lnk/passwd", "not a directory")
	checkNothingDone(t, cache)

	// Absolute names are confined to the image, as extraction confines
	// them: "/abs/file" is abs/file of the image, nothing else.
	abs := newLayer(t, makeTar(t, tFile("/abs/file", "inside"), tFile("//abs2", "inside too")), "gzip")
	writeLayout(t, layoutDir, "abs", newImage(t, abs))
	res := convertT(t, "oci:"+layoutDir+":abs", Options{CacheDir: cache})
	img, err := rafs.Open(res.Bootstrap)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var paths []string
	img.Walk(func(p string, _ *rafs.Entry) error { paths = append(paths, p); return nil })
	if strings.Join(paths, " ") != "/ /abs /abs/file /abs2" {
		t.Errorf("image paths %v, want / /abs /abs/file /abs2", paths)
	}
	checkCacheConsistent(t, cache)
}

func TestHostileManifests(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "ok", newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip")))
	cases := []struct {
		tag, manifest, want string
	}{
		{"schema1", `{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}`, "schema 1"},
		{"nolayers", `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},"layers":[]}`, "no layers"},
		{"weirdtype", `{"schemaVersion":2,"mediaType":"application/x-nonsense","layers":[]}`, "unsupported manifest media type"},
		{"md5", `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"md5:0123456789abcdef0123456789abcdef"},"layers":[]}`, "unsupported hash"},
	}
	// The config of "nolayers": {}.
	if err := os.WriteFile(filepath.Join(layoutDir, "blobs", "sha256", sha256Hash([]byte("{}")).Hex), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		writeRawManifest(t, layoutDir, c.tag, []byte(c.manifest))
		expectError(t, "oci:"+layoutDir+":"+c.tag, Options{CacheDir: cache}, c.want)
	}
	// A layer of a media type nothing can decompress.
	odd := newLayer(t, makeTar(t, tFile("a", "a")), "gzip")
	odd.mt = "application/vnd.example.layer.v1.tar+brotli"
	writeLayout(t, layoutDir, "brotli", newImage(t, odd))
	expectError(t, "oci:"+layoutDir+":brotli", Options{CacheDir: cache}, "unsupported layer media type")
	// A tag that is not there lists the ones that are.
	expectError(t, "oci:"+layoutDir+":nope", Options{CacheDir: cache}, "no such manifest", "ok")
	checkNothingDone(t, cache)
}

// TestConvertNoSpace: a conversion that would eat into the reserve stops
// before writing and says why.
func TestConvertNoSpace(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "v1", newImage(t, newLayer(t, makeTar(t, tFile("a", "a")), "gzip")))
	expectError(t, "oci:"+layoutDir+":v1", Options{CacheDir: cache, ReserveBytes: 1 << 60}, "layer 0", "the layer needs 94 B but", "free (keeping 1073741824.0 GiB in reserve)")
	checkNothingDone(t, cache)
}
