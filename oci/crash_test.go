package oci

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/rafsnbd/rafsnbd/internal/testregistry"
	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// crashImage is three layers of incompressible data (so that compressed
// and uncompressed sizes are alike) plus some files.
func crashImage(t *testing.T, mib int) v1.Image {
	r := rand.New(rand.NewPCG(7, 7))
	var layers []v1.Layer
	for i := range 3 {
		data := make([]byte, mib<<20)
		for j := range data {
			data[j] = byte(r.Uint32())
		}
		tb := makeTar(t,
			tDir(fmt.Sprintf("layer%d/", i), 0o755),
			withSize(tFile(fmt.Sprintf("layer%d/data", i), ""), data),
			tFile(fmt.Sprintf("layer%d/small", i), "small"),
			tFile("common", fmt.Sprint("from layer ", i)),
		)
		layers = append(layers, newLayer(t, tb, "gzip"))
	}
	return newImage(t, layers...)
}

func withSize(e tarEnt, data []byte) tarEnt {
	e.data, e.hdr.Size = data, int64(len(data))
	return e
}

// runCLI starts rafsnbd convert and returns the command and its output.
func startCLI(t *testing.T, cache, ref string, extra ...string) (*exec.Cmd, *bytes.Buffer, *bytes.Buffer) {
	t.Helper()
	args := append([]string{"--log-level", "debug", "convert", "--cache-dir", cache, "--insecure"}, extra...)
	args = append(args, ref)
	cmd := exec.Command(rafsnbdBinary(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, &stdout, &stderr
}

// killWhen runs a conversion and kills it with SIGKILL as soon as cond
// holds; it reports whether the kill happened before the process ended.
func killWhen(t *testing.T, cache, ref string, what string, cond func() bool) bool {
	t.Helper()
	cmd, _, stderr := startCLI(t, cache, ref, "--export", "image", "--verity")
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case err := <-done:
			t.Logf("kill point %q: not reached, the conversion ended first (err %v)", what, err)
			if err != nil {
				t.Fatalf("conversion failed: %v\n%s", err, stderr)
			}
			return false
		case <-deadline:
			cmd.Process.Kill()
			<-done
			t.Fatalf("kill point %q: not reached in 2 minutes\n%s", what, stderr)
		default:
		}
		if cond() {
			cmd.Process.Signal(syscall.SIGKILL)
			err := <-done
			if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Logf("kill point %q: process ended with %v before the signal", what, err)
				return false
			}
			t.Logf("kill point %q: killed", what)
			return true
		}
		time.Sleep(time.Millisecond)
	}
}

func globAny(patterns ...string) bool {
	for _, p := range patterns {
		if m, _ := filepath.Glob(p); len(m) > 0 {
			return true
		}
	}
	return false
}

func stagedTarOver(cache string, n int64) bool {
	m, _ := filepath.Glob(filepath.Join(cache, "staging", "*", "layer.tar"))
	for _, p := range m {
		if st, err := os.Stat(p); err == nil && st.Size() > n {
			return true
		}
	}
	return false
}

// TestConvertKilled kills the CLI at several points of a conversion and
// checks after each that the cache holds nothing half-done as done, then
// that the next run completes with the bytes a clean conversion gives.
func TestConvertKilled(t *testing.T) {
	testutil.SkipShort(t)
	reg := testregistry.Start(t)
	img := crashImage(t, 6)
	pushImage(t, reg+"/crash/img:v1", img)
	slow := testregistry.Throttle(t, reg, 12<<20).Addr // ~1.5 s of download for 18 MiB
	ref := slow + "/crash/img:v1"
	dir := t.TempDir()

	// The reference: a clean, uninterrupted conversion.
	clean := convertT(t, reg+"/crash/img:v1", Options{CacheDir: filepath.Join(dir, "clean"), Export: ExportImage, Verity: true, Insecure: true})
	cleanBoot, cleanDisk := testutil.FileSHA256(t, clean.Bootstrap), testutil.FileSHA256(t, clean.Exports[0].Path)

	cache := filepath.Join(dir, "cache")
	points := []struct {
		what string
		cond func() bool
	}{
		{"downloading the first layers", func() bool { return stagedTarOver(cache, 1<<20) }},
		{"after the first layer is published", func() bool { return globAny(filepath.Join(cache, "layers", "*.boot")) }},
		{"downloading the remaining layers", func() bool {
			// A layer is published (by the run killed before) and others
			// are staged. (Two published while one still stages was
			// reached only at times: layers download in parallel and
			// finish together.)
			return globAny(filepath.Join(cache, "layers", "*.boot")) && stagedTarOver(cache, 0)
		}},
		{"writing the disk", func() bool { return globAny(filepath.Join(cache, "blobs", ".*.image.disk.tmp-*")) }},
	}
	killed := 0
	for _, p := range points {
		// The disk is written in well under a second: when a run ends
		// before the kill, delete its disk (not its record) and try again.
		for try := 0; try < 5; try++ {
			if killWhen(t, cache, ref, p.what, p.cond) {
				killed++
				break
			}
			disks, _ := filepath.Glob(filepath.Join(cache, "blobs", "*.image.disk"))
			for _, d := range disks {
				os.Remove(d)
			}
		}
		checkCacheConsistent(t, cache)
		if globAny(filepath.Join(cache, "blobs", "*.image.disk")) && !globAny(filepath.Join(cache, "images", "*", "image.json")) {
			t.Errorf("after %q: an image disk exists but the image is not converted", p.what)
		}
	}
	if killed < len(points) {
		t.Errorf("only %d of %d kill points were reached", killed, len(points))
	}

	// The next run finishes and gives the clean bytes.
	cmd, stdout, stderr := startCLI(t, cache, ref, "--export", "image", "--verity")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("convert after kills: %v\n%s", err, stderr)
	}
	if !strings.Contains(stdout.String(), clean.Exports[0].Verity) {
		t.Errorf("after kills the output lacks the clean verity line %q:\n%s", clean.Exports[0].Verity, stdout)
	}
	boot, blobs, err := ResolveImage(cache, ref)
	if err != nil {
		t.Fatal(err)
	}
	if testutil.FileSHA256(t, boot) != cleanBoot {
		t.Error("the image bootstrap differs from a clean conversion's")
	}
	disk := filepath.Join(blobs, filepath.Base(clean.Exports[0].Path))
	if testutil.FileSHA256(t, disk) != cleanDisk {
		t.Error("the image disk differs from a clean conversion's")
	}
	checkCacheConsistent(t, cache)
	// Every leftover was cleaned by the run that finished.
	if globAny(filepath.Join(cache, "staging", "*"), filepath.Join(cache, "blobs", ".*"), filepath.Join(cache, "images", "*", ".*")) {
		out, _ := exec.Command("find", cache).Output()
		t.Errorf("leftovers after a complete run:\n%s", out)
	}
}

// TestConvertConcurrentCLI: two processes converting one image at once
// both succeed with the same result; one waits for the other.
func TestConvertConcurrentCLI(t *testing.T) {
	testutil.SkipShort(t)
	reg := testregistry.Start(t)
	pushImage(t, reg+"/conc/img:v1", crashImage(t, 2))
	ref := testregistry.Throttle(t, reg, 8<<20).Addr + "/conc/img:v1"
	cache := filepath.Join(t.TempDir(), "cache")
	a, aout, aerr := startCLI(t, cache, ref, "--export", "image", "--verity")
	b, bout, berr := startCLI(t, cache, ref, "--export", "image", "--verity")
	if err := a.Wait(); err != nil {
		t.Fatalf("first: %v\n%s", err, aerr)
	}
	if err := b.Wait(); err != nil {
		t.Fatalf("second: %v\n%s", err, berr)
	}
	if aout.String() != bout.String() || !strings.Contains(aout.String(), "dm-verity options: ") {
		t.Errorf("outputs differ:\n%s\n---\n%s", aout, bout)
	}
	logs := aerr.String() + berr.String()
	if !strings.Contains(logs, "waiting for another conversion of this image") {
		t.Errorf("neither process waited for the other:\n%s", logs)
	}
	checkCacheConsistent(t, cache)
}

// TestConvertConcurrentShared: in one process, the same image twice and
// another image sharing its base layer, all at once: every layer is
// downloaded exactly once.
func TestConvertConcurrentShared(t *testing.T) {
	dir := t.TempDir()
	base := newLayer(t, makeTar(t, tFile("base", strings.Repeat("b", 1<<20))), "gzip")
	topA := newLayer(t, makeTar(t, tFile("a", "a")), "gzip")
	topB := newLayer(t, makeTar(t, tFile("b", "b")), "gzip")
	layoutDir := writeLayout(t, filepath.Join(dir, "layout"), "a", newImage(t, base, topA))
	writeLayout(t, layoutDir, "b", newImage(t, base, topB))

	var mu sync.Mutex
	downloads := map[string]int{} // layer digest -> downloads finished
	progress := func(p Progress) {
		if p.Phase == PhaseDownload && p.Done == p.Total {
			mu.Lock()
			downloads[p.Digest]++
			mu.Unlock()
		}
	}
	cache := filepath.Join(dir, "cache")
	refs := []string{"oci:" + layoutDir + ":a", "oci:" + layoutDir + ":a", "oci:" + layoutDir + ":b"}
	results := make([]*Result, len(refs))
	errs := make([]error, len(refs))
	var wg sync.WaitGroup
	for i, ref := range refs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = Convert(context.Background(), ref, Options{CacheDir: cache, Export: ExportImage, Progress: progress})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("%s: %v", refs[i], err)
		}
	}
	for _, l := range []*memLayer{base, topA, topB} {
		if n := downloads[l.digest.String()]; n != 1 {
			t.Errorf("layer %s downloaded %d times, want once", l.digest, n)
		}
	}
	if results[0].Reused == results[1].Reused {
		t.Errorf("the two conversions of one image: reused %v and %v, want exactly one", results[0].Reused, results[1].Reused)
	}
	if testutil.FileSHA256(t, results[0].Exports[0].Path) != testutil.FileSHA256(t, results[1].Exports[0].Path) {
		t.Error("the same image exported twice differs")
	}
	checkCacheConsistent(t, cache)
}
