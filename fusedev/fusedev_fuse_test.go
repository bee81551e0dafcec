package fusedev

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"syscall"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// memDev is a device in memory whose reads fail inside [badOff, badOff+badLen).
type memDev struct {
	data           []byte
	badOff, badLen int64
	ctxReads       int
}

func (m *memDev) Size() int64 { return int64(len(m.data)) }

func (m *memDev) ReadAt(p []byte, off int64) (int, error) {
	if off < m.badOff+m.badLen && off+int64(len(p)) > m.badOff {
		// Return some bytes with the error: they must not reach the reader.
		return copy(p[:1], m.data[off:]), errors.New("bad range")
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

type ctxMemDev struct{ memDev }

func (m *ctxMemDev) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if ctx == nil {
		return 0, errors.New("no context")
	}
	m.ctxReads++
	return m.ReadAt(p, off)
}

func mountTest(t *testing.T, dev Device) *Server {
	t.Helper()
	testutil.RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testutil.Unavailable(t, "no /dev/fuse")
	}
	s, err := Mount(t.TempDir(), dev, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Error(err)
		}
		s.Wait()
		if ConnectionExists(s.Connection()) {
			t.Errorf("FUSE connection %d still listed after unmount", s.Connection())
		}
	})
	return s
}

func TestFusedevServesDeviceBytes(t *testing.T) {
	// An odd size: the last page is partial.
	data := make([]byte, 3<<20+123)
	rand.New(rand.NewSource(1)).Read(data)
	dev := &ctxMemDev{memDev{data: data, badOff: -1}}
	s := mountTest(t, dev)
	st, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != int64(len(data)) || st.Mode().Perm() != 0o444 || !st.Mode().IsRegular() {
		t.Fatalf("file is %v, %d bytes; want a regular 0444 file of %d", st.Mode(), st.Size(), len(data))
	}
	got, err := os.ReadFile(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("file content differs from the device")
	}
	if dev.ctxReads == 0 {
		t.Error("reads did not go through ReadAtContext")
	}
	if _, err := os.OpenFile(s.Path(), os.O_RDWR, 0); err == nil {
		t.Error("opened the file for writing")
	}
	if got := s.Stats(); got.BytesRead < uint64(len(data)) || got.ReadErrors != 0 {
		t.Errorf("stats %+v after reading %d bytes", got, len(data))
	}
}

func TestFusedevReadErrorIsEIO(t *testing.T) {
	data := make([]byte, 1<<20)
	rand.New(rand.NewSource(2)).Read(data)
	dev := &memDev{data: data, badOff: 512 << 10, badLen: 1}
	s := mountTest(t, dev)
	f, err := os.Open(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, 512<<10); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a failing range: %v, want EIO", err)
	}
	if n, err := f.ReadAt(buf, 0); err != nil || n != len(buf) || !bytes.Equal(buf, data[:4096]) {
		t.Fatalf("read of a good range: %d, %v (equal %v)", n, err, bytes.Equal(buf, data[:4096]))
	}
	if s.Stats().ReadErrors == 0 {
		t.Error("no read error counted")
	}
}
