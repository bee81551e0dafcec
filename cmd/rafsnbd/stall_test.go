package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// A registry that accepts a blob read and never answers it does not hold
// serve past its drain timeout: with an NBD read in flight on that blob,
// SIGTERM ends serve within the drain timeout (10 s) and it exits 0.
func TestServeStopsWithStalledRegistry(t *testing.T) {
	testutil.RequireTool(t, "nbdcopy")
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	const id = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
	st, err := os.Stat(filepath.Join(filepath.Dir(boot), id)) // the blob's stored size
	if err != nil {
		t.Fatal(err)
	}
	blobFile := filepath.Join(filepath.Dir(boot), id)
	var stall atomic.Bool // from when serve is up: reads of the blob are accepted and never answered
	var gets atomic.Int32
	release := make(chan struct{})
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v2/":
			w.WriteHeader(http.StatusOK)
		case strings.HasSuffix(r.URL.Path, "/blobs/sha256:"+id) && r.Method == http.MethodHead:
			w.Header().Set("Content-Length", fmt.Sprint(st.Size()))
			w.WriteHeader(http.StatusOK)
		case strings.HasSuffix(r.URL.Path, "/blobs/sha256:"+id) && !stall.Load():
			http.ServeFile(w, r, blobFile) // opening reads the blob's chunk table
		case strings.HasSuffix(r.URL.Path, "/blobs/sha256:"+id):
			gets.Add(1)
			select { // accepted, never answered
			case <-r.Context().Done():
			case <-release:
			}
		default:
			http.NotFound(w, r)
		}
	}))
	defer reg.Close()
	defer close(release)

	bin := buildBinary(t)
	w := t.TempDir()
	cmd, uri, stderr := startServeIn(t, bin, w, "--listen", "unix:"+filepath.Join(w, "s"), "-B", boot,
		"--registry", strings.TrimPrefix(reg.URL, "http://")+"/app", "--cache-dir", filepath.Join(w, "cache"))
	stall.Store(true)
	copyCmd := exec.Command("nbdcopy", uri, filepath.Join(w, "out"))
	if err := copyCmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { copyCmd.Process.Kill(); copyCmd.Wait() }()
	for deadline := time.Now().Add(20 * time.Second); gets.Load() == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no blob read reached the registry; serve stderr:\n%s", stderr)
		}
	}
	start := time.Now()
	cmd.Process.Signal(syscall.SIGTERM)
	code := waitExit(t, cmd, 30*time.Second)
	took := time.Since(start)
	t.Logf("serve stopped %v after SIGTERM with a read stalled in the registry (drain timeout 10s)", took.Round(time.Millisecond))
	if code != 0 || took > 12*time.Second {
		t.Errorf("serve exited %d after %v; want 0 within the 10 s drain timeout; stderr:\n%s", code, took, stderr)
	}
}
