package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/verity"
)

// nydusSnapshotterPattern is the fmt.Sscanf pattern nydus-snapshotter
// (pkg/tarfs, v0.16) applies to the whole of export --verity's stdout.
const nydusSnapshotterPattern = "dm-verity options: --no-superblock --format=1 -s \"\" --hash=sha256 --data-block-size=512 --hash-block-size=4096 --data-blocks %d --hash-offset %d %s\n"

// runAsNydusImage runs a command line as the nydus-image symlink does (argv[0]
// nydus-image), in process.
func runAsNydusImage(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := runMain(context.Background(), append([]string{"/usr/local/bin/nydus-image"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// nydusLayerTar is a small layer tar with a file of several 512-byte blocks.
func nydusLayerTar(t *testing.T, name, content string) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	mt := time.Unix(1700000000, 0)
	for _, h := range []*tar.Header{
		{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o755, ModTime: mt},
		{Typeflag: tar.TypeReg, Name: "d/" + name, Mode: 0o644, Size: int64(len(content)), ModTime: mt},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tw.Write([]byte(content)); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// nydusCreateFromFIFO runs create on a FIFO that a writer fills while create
// runs, as nydus-snapshotter does, and checks that the writer could write
// all of it.
func nydusCreateFromFIFO(t *testing.T, dir, boot, id string, data []byte) {
	t.Helper()
	fifo := filepath.Join(dir, "layer_"+id[:8]+"_tar.fifo")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	written := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			written <- err
			return
		}
		for off := 0; off < len(data) && err == nil; off += 1000 { // dribbled
			_, err = f.Write(data[off:min(off+1000, len(data))])
		}
		written <- errors.Join(err, f.Close())
	}()
	code, stdout, stderr := runAsNydusImage(t, "create", "--type", "tar-tarfs", "--bootstrap", boot,
		"--blob-id", id, "--blob-dir", filepath.Join(dir, "cache"), fifo)
	if code != 0 {
		t.Fatalf("create: exit %d: %s", code, stderr)
	}
	if stdout != "" {
		t.Errorf("create printed %q", stdout)
	}
	if err := <-written; err != nil {
		t.Errorf("the FIFO's writer: %v", err)
	}
}

// The calls nydus-snapshotter's tarfs mode makes, in its order: create
// per layer from a FIFO, merge, inspect -R blobs, export --block --verity;
// outputs where and as it reads them.
func TestNydusImageSnapshotterCalls(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	ids := []string{strings.Repeat("a1", 32), strings.Repeat("b2", 32)}
	var boots []string
	for i, id := range ids {
		data := nydusLayerTar(t, fmt.Sprintf("f%d", i), strings.Repeat(fmt.Sprint(i), 3000+i))
		boot := filepath.Join(dir, fmt.Sprintf("layer%d.boot", i))
		nydusCreateFromFIFO(t, dir, boot, id, data)
		boots = append(boots, boot)
		// The snapshotter keeps the tar it teed as cache/<blob id>; create
		// itself writes no blob.
		if ents, _ := os.ReadDir(cache); len(ents) != i {
			t.Fatalf("create wrote into --blob-dir: %d entries", len(ents))
		}
		if err := os.WriteFile(filepath.Join(cache, id), data, 0o644); err != nil {
			t.Fatal(err)
		}
		// The same bootstrap as 'rafsnbd create' from the tar file.
		ref := filepath.Join(dir, fmt.Sprintf("ref%d.boot", i))
		if code, _, stderr := runLine(t, "create", "-q", "-B", ref, "-D", filepath.Join(dir, "refblobs"),
			"--type", "tarfs", "--blob-id", id, filepath.Join(cache, id)); code != 0 {
			t.Fatalf("rafsnbd create: %s", stderr)
		}
		if !bytes.Equal(readFileT(t, boot), readFileT(t, ref)) {
			t.Errorf("layer %d: the bootstrap from the FIFO differs from rafsnbd create's", i)
		}
	}

	merged := filepath.Join(dir, "image.boot")
	if code, _, stderr := runAsNydusImage(t, append([]string{"merge", "--bootstrap", merged}, boots...)...); code != 0 {
		t.Fatalf("merge: exit %d: %s", code, stderr)
	}
	code, stdout, stderr := runAsNydusImage(t, "inspect", "-R blobs", merged)
	if code != 0 {
		t.Fatalf("inspect: exit %d: %s", code, stderr)
	}
	for _, id := range ids {
		if !strings.Contains(stdout, `"blob_id":"`+id+`"`) {
			t.Errorf("inspect output lacks \"blob_id\":\"%s\": %s", id, stdout)
		}
	}
	if strings.Index(stdout, ids[0]) > strings.Index(stdout, ids[1]) {
		t.Errorf("merge did not keep the lowest layer first: %s", stdout)
	}

	for _, tc := range []struct {
		boot, kind string
		compat     verity.Compat
	}{
		{merged, "image", verity.Standard},
		{boots[1], "layer", verity.Standard},
		{merged, "image", verity.NydusCompat},
	} {
		t.Run(tc.kind+"-"+tc.compat.String(), func(t *testing.T) {
			if tc.compat == verity.NydusCompat {
				t.Setenv(nydusVerityCompatEnv, "nydus")
			}
			disk := filepath.Join(cache, ids[1]+"."+tc.kind+".disk.tarfs.tmp")
			code, stdout, stderr := runAsNydusImage(t, "export", "--block", "--localfs-dir", cache,
				"--bootstrap", tc.boot, "--output", disk, "--verity")
			if code != 0 {
				t.Fatalf("export: exit %d: %s", code, stderr)
			}
			var blocks, offset uint64
			var root string
			if n, err := fmt.Sscanf(stdout, nydusSnapshotterPattern, &blocks, &offset, &root); err != nil || n != 3 {
				t.Fatalf("the snapshotter's pattern does not parse export's stdout %q: %d, %v", stdout, n, err)
			}
			p := verity.NydusParams(blocks*512, 512)
			p.Compat = tc.compat
			if p.HashOffset != offset {
				t.Errorf("hash offset %d, want %d", offset, p.HashOffset)
			}
			rootBytes, err := hex.DecodeString(root)
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(disk)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := verity.Verify(context.Background(), f, f, p, rootBytes); err != nil {
				t.Errorf("the disk does not verify against the printed root: %v", err)
			}
		})
	}
	// Without --verity: a disk, nothing on stdout to parse.
	code, stdout, stderr = runAsNydusImage(t, "export", "--block", "--localfs-dir", cache,
		"--bootstrap", merged, "--output", filepath.Join(dir, "plain.disk"))
	if code != 0 || stdout != "" {
		t.Errorf("export without --verity: exit %d, stdout %q, stderr %s", code, stdout, stderr)
	}
}

func readFileT(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Whatever else nydus-image does is refused in one line, exit status 2,
// nothing on stdout, whether run as nydus-image or as 'rafsnbd
// nydus-image'.
func TestNydusImageUnsupported(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"check", "--bootstrap", "x"}, "nydus-image: subcommand check is not supported by rafsnbd"},
		{[]string{"create", "--bootstrap", "b", "dir/"}, "nydus-image: create: --type directory (the default) is not supported by rafsnbd (only tar-tarfs)"},
		{[]string{"create", "--type", "tar-rafs", "x.tar"}, "--type tar-rafs is not supported by rafsnbd (only tar-tarfs)"},
		{[]string{"create", "--type", "tar-tarfs", "--compressor", "zstd", "x.tar"}, "create: flag --compressor is not supported by rafsnbd"},
		{[]string{"inspect", "-R stats", "x.boot"}, "inspect: -R stats is not supported by rafsnbd (only -R blobs)"},
		{[]string{"inspect", "x.boot"}, "inspect: the interactive inspector is not supported by rafsnbd"},
		{[]string{"export", "--localfs-dir", "d", "--bootstrap", "b", "--output", "o"}, "export: export without --block is not supported by rafsnbd"},
		{[]string{"merge", "--parent-bootstrap", "p", "--bootstrap", "o", "a"}, "merge: flag --parent-bootstrap is not supported by rafsnbd"},
		{[]string{"export", "--block", "--output"}, "nydus-image: export: --output needs a value"},
		{[]string{"merge", "a.boot"}, "nydus-image: merge: --bootstrap is required"},
		{[]string{"create", "--type", "tar-tarfs", "--bootstrap", "b", "--blob-id", "i", "--blob-dir", "d"}, "create: give exactly one TAR"},
		{nil, "nydus-image: no subcommand"},
	} {
		for _, prefix := range [][]string{{"/usr/local/bin/nydus-image"}, {"rafsnbd", "nydus-image"}} {
			var stdout, stderr bytes.Buffer
			code := runMain(context.Background(), append(append([]string{}, prefix...), tc.args...), &stdout, &stderr)
			if code != exitUsage || stdout.Len() != 0 || !strings.Contains(stderr.String(), tc.want) || strings.Count(stderr.String(), "\n") != 1 {
				t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 2 and one line with %q", append(prefix, tc.args...), code, stdout.String(), stderr.String(), tc.want)
			}
		}
	}
}

// A failure of the work itself (a missing bootstrap) is exit status 1 with
// the path named, and leaves no output file.
func TestNydusImageFailures(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.boot")
	out := filepath.Join(dir, "out.boot")
	code, _, stderr := runAsNydusImage(t, "merge", "--bootstrap", out, missing)
	if code != 1 || !strings.Contains(stderr, missing) {
		t.Errorf("merge of a missing layer: exit %d, %q", code, stderr)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("merge left %s", ents[0].Name())
	}
	code, _, stderr = runAsNydusImage(t, "inspect", "-R blobs", missing)
	if code != 1 || !strings.Contains(stderr, missing) {
		t.Errorf("inspect of a missing bootstrap: exit %d, %q", code, stderr)
	}
}
