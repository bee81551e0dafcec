package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

func TestExportURI(t *testing.T) {
	unix := &net.UnixAddr{Name: "/tmp/a b#c/s&o?ck", Net: "unix"}
	if got, want := exportURI(unix, "my disk"), "nbd+unix:///my%20disk?socket=/tmp/a%20b%23c/s%26o%3Fck"; got != want {
		t.Errorf("unix: %s, want %s", got, want)
	}
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range []string{"::", "0.0.0.0"} {
		got := exportURI(&net.TCPAddr{IP: net.ParseIP(ip), Port: 10809}, "x")
		if got != "nbd://"+net.JoinHostPort(host, "10809")+"/x" {
			t.Errorf("wildcard %s: %s, want the host name %s", ip, got, host)
		}
	}
	if got := exportURI(&net.TCPAddr{IP: net.ParseIP("::1"), Port: 7}, ""); got != "nbd://[::1]:7/" {
		t.Errorf("loopback: %s", got)
	}
}

// startServeIn starts the binary's serve in dir and returns the process and
// the first URI it prints.
func startServeIn(t *testing.T, bin, dir string, args ...string) (*exec.Cmd, string, *bytes.Buffer) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--log-level", "warn", "serve"}, args...)...)
	cmd.Dir = dir
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line := make(chan string, 1)
	go func() { // the first line is the first export's URI, once listening
		br := bufio.NewReader(stdout)
		l, _ := br.ReadString('\n')
		line <- strings.TrimSpace(l)
		io.Copy(io.Discard, br)
	}()
	select {
	case uri := <-line:
		return cmd, uri, &stderr
	case <-time.After(30 * time.Second):
		t.Fatalf("serve printed no URI in 30 s; stderr:\n%s", stderr.String())
	}
	return nil, "", nil
}

// waitExit waits for cmd and returns its exit status.
func waitExit(t *testing.T, cmd *exec.Cmd, limit time.Duration) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(limit):
		cmd.Process.Kill()
		t.Fatalf("%s did not exit within %v", cmd.Args, limit)
	}
	return -1
}

// The URI serve prints connects, from any directory, even when the socket
// was given as a relative path with a space, '#' and '&' in it; SIGHUP then
// stops serve as SIGTERM does: exit 0, socket removed.
func TestServeURIAndHangup(t *testing.T) {
	testutil.RequireTool(t, "nbdinfo")
	bin := buildBinary(t)
	dir := t.TempDir()
	sub := filepath.Join(dir, "a b#c")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "disk")
	if err := os.WriteFile(disk, bytes.Repeat([]byte{7}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd, uri, stderr := startServeIn(t, bin, dir, "--listen", "unix:a b#c/s&ock", "--disk", disk)
	if !strings.Contains(uri, "socket=/") {
		t.Errorf("URI %q has a relative socket path", uri)
	}
	if size := strings.TrimSpace(run(t, "nbdinfo", "--size", uri)); size != "1048576" {
		t.Errorf("nbdinfo --size %s: %s", uri, size)
	}
	cmd.Process.Signal(syscall.SIGHUP)
	if code := waitExit(t, cmd, 15*time.Second); code != 0 {
		t.Errorf("serve exited %d on SIGHUP; stderr:\n%s", code, stderr)
	}
	if _, err := os.Lstat(filepath.Join(sub, "s&ock")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after SIGHUP: %v", err)
	}
}

// Ctrl-C of a long command says "interrupted" and exits 130.
func TestInterruptExitStatus(t *testing.T) {
	bin := buildBinary(t)
	data := filepath.Join(t.TempDir(), "big")
	if err := os.WriteFile(data, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(data, 16<<30); err != nil { // sparse: hashing it takes several seconds
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "verity", "format", data, filepath.Join(filepath.Dir(data), "tree"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	cmd.Process.Signal(os.Interrupt)
	if code := waitExit(t, cmd, 30*time.Second); code != exitInterrupted || !strings.Contains(stderr.String(), "rafsnbd: interrupted") {
		t.Errorf("exit %d, stderr %q; want 130 and 'interrupted'", code, stderr.String())
	}
}
