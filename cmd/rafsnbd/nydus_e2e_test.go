package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
	"github.com/rafsnbd/rafsnbd/internal/treecmp"
	"github.com/rafsnbd/rafsnbd/oci"
)

// Issue 14: the real nydus bootstrap (rafs-v6-2.2.boot) and its blob,
// published as a nydus image into an OCI layout, served by serve --image
// from the layout and mounted through the kernel with the fixture
// README's file digests. The blob's id is not the sha256 of its bytes: the
// layout stores it by digest, and its layer's org.rafsnbd.nydus.blob-id
// annotation names the id the bootstrap uses.
func TestNydusFixtureServe(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "nbdfuse")
	bin := buildBinary(t)
	const blobID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	boot, err := os.ReadFile(testutil.NydusFixture(t, "rafs-v6-2.2.boot"))
	if err != nil {
		t.Fatal(err)
	}
	ref := "oci:" + filepath.Join(t.TempDir(), "layout") + ":v1"
	if _, err := oci.PublishNydus(context.Background(), ref, nil, []oci.NydusBlobFile{{ID: blobID, Path: testutil.NydusFixture(t, blobID)}}, boot, oci.NydusPublishOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, cache := range []string{"", filepath.Join(t.TempDir(), "cache")} {
		args := []string{"--image", ref}
		if cache != "" {
			args = append(args, "--cache-dir", cache)
		}
		mnt := mountNBD(t, startServe(t, bin, args...))
		for name, want := range map[string]string{
			"lib.rs":     "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69",
			"sync_io.rs": "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96",
		} {
			if got := testutil.FileSHA256(t, filepath.Join(mnt, name)); got != want {
				t.Fatalf("cache %q: %s has sha256 %s, the fixture README says %s", cache, name, got, want)
			}
		}
	}
}

// Issue 14 items 2 and 3 through the binary and the kernel: convert
// --format nydus of a two-layer image (whiteouts, opaque directory,
// hard link, symlink, xattr) from a local registry to the same registry;
// serve --image from an empty cache through a counting proxy, mounted
// through nbdfuse + loop, equals umoci's extraction of the source; a
// mount plus one small file fetches at most 2% of the blob bytes.
func TestNydusConvertServe(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "nbdfuse", "umoci")
	bin := buildBinary(t)
	addr := testregistry.Start(t)
	w := t.TempDir()
	base, changes := lazyTestImage(t, w)
	src, dst := addr+"/nydus/img:v1", addr+"/nydus/img:v1-nydus"
	layoutDir := filepath.Join(w, "layout")
	run(t, "go", "run", "../../scripts/mkoci", "-layout", layoutDir, "-tag", "v1", "-push", src, "-insecure", base, changes)

	prefetch := filepath.Join(w, "prefetch.txt")
	if err := os.WriteFile(prefetch, []byte("/etc/passwd\n# a comment\n/hello.txt\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var res oci.NydusConvertResult
	out := run(t, bin, "convert", "--format", "nydus", "--json", "--insecure", "--prefetch-files", prefetch,
		"--cache-dir", filepath.Join(w, "convert-cache"), src, dst)
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("convert --json: %v\n%s", err, out)
	}
	var blobBytes int64
	blobs := map[string]bool{}
	for _, l := range res.Published.Layers {
		if oci.IsNydusBlobLayer(l) {
			blobBytes += l.Size
			blobs[l.Digest.String()] = true
		}
	}
	t.Logf("convert --format nydus: %d blobs, %d blob bytes, %d chunks, %d pushed bytes", len(blobs), blobBytes, res.Chunks, res.Published.PushedBytes)

	proxy, fetched := countingProxy(t, addr)
	want := scanNoDirMtime(t, umociUnpackDir(t, layoutDir, "v1"))
	uri := startServe(t, bin, "--image", proxy+"/nydus/img:v1-nydus", "--insecure", "--cache-dir", filepath.Join(w, "cache-small"))
	mnt := mountNBD(t, uri)
	if b, err := os.ReadFile(filepath.Join(mnt, "etc/passwd")); err != nil || string(b) != "root:x:0:0:root:/root:/bin/sh\n" {
		t.Fatalf("etc/passwd: %q, %v", b, err)
	}
	var got int64
	for d, n := range fetched() {
		if blobs[d] {
			got += n
		}
	}
	t.Logf("mount + one small file: %d of %d blob bytes fetched (%.2f%%)", got, blobBytes, 100*float64(got)/float64(blobBytes))
	if got > blobBytes/50 {
		t.Fatalf("mount + one small file fetched %d of %d blob bytes: more than 2%%", got, blobBytes)
	}

	uri = startServe(t, bin, "--image", dst, "--insecure", "--cache-dir", filepath.Join(w, "cache-tree"))
	gotTree := scanNoDirMtime(t, mountNBD(t, uri))
	if diffs := treecmp.Diff(want, gotTree, treecmp.Options{}); len(diffs) > 0 {
		t.Fatalf("nydus mount differs from umoci's extraction in %d ways:\n%s", len(diffs), treecmp.Summary(diffs, 30))
	}
	t.Logf("nydus mount: %d entries equal umoci's extraction", len(gotTree))
}

// countingProxy forwards to the registry at addr and counts the response
// bytes of blob GETs by digest.
func countingProxy(t *testing.T, addr string) (string, func() map[string]int64) {
	t.Helper()
	var mu sync.Mutex
	counts := map[string]int64{}
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: addr})
	rp.ModifyResponse = func(r *http.Response) error {
		if i := strings.Index(r.Request.URL.Path, "/blobs/"); i >= 0 && r.Request.Method == http.MethodGet {
			r.Body = &countBody{ReadCloser: r.Body, add: func(n int) {
				mu.Lock()
				counts[r.Request.URL.Path[i+len("/blobs/"):]] += int64(n)
				mu.Unlock()
			}}
		}
		return nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: rp}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), func() map[string]int64 {
		mu.Lock()
		defer mu.Unlock()
		m := map[string]int64{}
		for k, v := range counts {
			m[k] = v
		}
		return m
	}
}

type countBody struct {
	io.ReadCloser
	add func(int)
}

func (b *countBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.add(n)
	return n, err
}
