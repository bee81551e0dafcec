package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// memDevice is a Device over a byte slice.
type memDevice struct{ data []byte }

func (d *memDevice) Size() int64 { return int64(len(d.data)) }
func (d *memDevice) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(d.data)) {
		return 0, fmt.Errorf("memDevice: offset %d out of range", off)
	}
	n := copy(p, d.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(n int, seed uint64) []byte {
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 1, 2, 3})
	b := make([]byte, n)
	_, _ = r.Read(b)
	return b
}

// socketPair returns two connected AF_UNIX stream sockets as net.Conns, the
// same kind of socket the kernel-attach path hands to ServeTransmission.
func socketPair(t testing.TB) (server, client net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), fmt.Sprintf("socketpair-%d", i))
		c, err := net.FileConn(f)
		_ = f.Close() // FileConn dups the descriptor
		if err != nil {
			t.Fatalf("FileConn: %v", err)
		}
		conns[i] = c
	}
	t.Cleanup(func() { _ = conns[1].Close() })
	return conns[0], conns[1]
}

// startEngine runs ServeTransmission on one end of a socket pair and returns
// the other end plus a channel that yields ServeTransmission's result.
func startEngine(t testing.TB, ctx context.Context, dev Device, opts TransmissionOptions) (*rawClient, <-chan error) {
	t.Helper()
	srv, cli := socketPair(t)
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		done <- ServeTransmission(ctx, srv, dev, opts)
	}()
	t.Cleanup(func() {
		_ = cli.Close()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Errorf("ServeTransmission did not return after the client closed")
		}
	})
	return newRawClient(cli), done
}

// rawClient speaks the transmission phase byte by byte, so tests can send
// what a well-behaved client never would.
type rawClient struct {
	conn net.Conn
	br   *bufio.Reader
	mu   sync.Mutex // serialises sends from several goroutines
}

func newRawClient(c net.Conn) *rawClient {
	return &rawClient{conn: c, br: bufio.NewReaderSize(c, 1<<20)}
}

func encodeRequest(dst []byte, flags, cmd uint16, cookie, offset uint64, length uint32) []byte {
	var h [requestHeaderSize]byte
	binary.BigEndian.PutUint32(h[0:4], magicRequest)
	binary.BigEndian.PutUint16(h[4:6], flags)
	binary.BigEndian.PutUint16(h[6:8], cmd)
	binary.BigEndian.PutUint64(h[8:16], cookie)
	binary.BigEndian.PutUint64(h[16:24], offset)
	binary.BigEndian.PutUint32(h[24:28], length)
	return append(dst, h[:]...)
}

func (c *rawClient) send(t testing.TB, flags, cmd uint16, cookie, offset uint64, length uint32, payload []byte) {
	t.Helper()
	msg := encodeRequest(nil, flags, cmd, cookie, offset, length)
	msg = append(msg, payload...)
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.conn.Write(msg); err != nil {
		t.Fatalf("sending command %d: %v", cmd, err)
	}
}

// reply reads one simple reply header.
func (c *rawClient) reply(t testing.TB) (errno uint32, cookie uint64) {
	t.Helper()
	var h [replyHeaderSize]byte
	_ = c.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		t.Fatalf("reading reply: %v", err)
	}
	if m := binary.BigEndian.Uint32(h[0:4]); m != magicSimpleReply {
		t.Fatalf("reply magic %#x", m)
	}
	return binary.BigEndian.Uint32(h[4:8]), binary.BigEndian.Uint64(h[8:16])
}

// data reads n bytes of reply payload.
func (c *rawClient) data(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		t.Fatalf("reading %d bytes of data: %v", n, err)
	}
	return b
}

// expectReply reads one reply and checks it is header-only with errno.
func (c *rawClient) expectReply(t testing.TB, wantErrno uint32, wantCookie uint64) {
	t.Helper()
	errno, cookie := c.reply(t)
	if errno != wantErrno || cookie != wantCookie {
		t.Fatalf("reply errno %d cookie %#x, want errno %d cookie %#x", errno, cookie, wantErrno, wantCookie)
	}
}

// read performs one READ and returns its data, failing the test on error.
func (c *rawClient) read(t testing.TB, cookie, offset uint64, length uint32) []byte {
	t.Helper()
	c.send(t, 0, cmdRead, cookie, offset, length, nil)
	c.expectReply(t, 0, cookie)
	return c.data(t, int(length))
}

// expectEOF checks the server closed the connection.
func (c *rawClient) expectEOF(t testing.TB) {
	t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	if n, err := c.br.Read(b[:]); !errors.Is(err, io.EOF) {
		t.Fatalf("expected EOF, got %d bytes, err %v", n, err)
	}
}

func wantResult(t testing.TB, done <-chan error, check func(error) bool, what string) {
	t.Helper()
	select {
	case err := <-done:
		if !check(err) {
			t.Fatalf("ServeTransmission returned %v, want %s", err, what)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("ServeTransmission did not return (want %s)", what)
	}
}

func checkBytes(t testing.TB, got, want []byte, what string) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: %d bytes differ from expected %d bytes, first at %d", what, len(got), len(want), i)
	}
}
