package regclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
)

// ReadBlobAt reads len(p) bytes of blob digest ("sha256:<hex>") at off
// with Range requests, only the bytes asked for crossing the network. A
// retry resumes after the bytes already received. eof reports that the
// blob ends before p is full; otherwise n < len(p) only with an error.
func (c *Client) ReadBlobAt(ctx context.Context, digest string, p []byte, off int64) (n int, eof bool, err error) {
	if off < 0 {
		return 0, false, fmt.Errorf("negative offset %d", off)
	}
	if len(p) == 0 {
		return 0, false, nil
	}
	hc, err := c.httpClient(ctx)
	if err != nil {
		return 0, false, err
	}
	u := c.url("blobs", digest)
	r := c.retrier()
	for {
		k, atEOF, err := c.readRange(ctx, hc, u, p[n:], off+int64(n))
		n += k // keep what arrived; a retry resumes after it
		eof = atEOF
		again, err := r.again(ctx, err)
		if !again {
			return n, eof, err
		}
	}
}

func (c *Client) readRange(ctx context.Context, hc *http.Client, u string, p []byte, off int64) (n int, eof bool, err error) {
	release, err := c.slot(ctx)
	if err != nil {
		return 0, false, err
	}
	defer release()
	resp, err := c.send(ctx, hc, http.MethodGet, u, http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1)}})
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	want := len(p)
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, end, _, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return 0, false, err
		}
		if start != off || end < start || end-start+1 > int64(len(p)) {
			return 0, false, fmt.Errorf("asked for bytes %d-%d, the registry sent Content-Range %q",
				off, off+int64(len(p))-1, resp.Header.Get("Content-Range"))
		}
		if got := int(end - start + 1); got < want {
			want, eof = got, true // the blob ends inside the range
		}
	case http.StatusOK:
		// The server ignored Range: skip to off in the full body. Slow but
		// correct; registries and blob stores answer 206 in practice.
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			if errors.Is(err, io.EOF) {
				return 0, true, nil
			}
			return 0, false, bodyError(ctx, err)
		}
	case http.StatusRequestedRangeNotSatisfiable:
		return 0, true, nil
	default:
		return 0, false, statusError(resp)
	}
	n, err = io.ReadFull(resp.Body, p[:want])
	c.bytes.Add(int64(n))
	if err != nil {
		if resp.StatusCode == http.StatusOK && n > 0 && errors.Is(err, io.ErrUnexpectedEOF) && resp.ContentLength == off+int64(n) {
			return n, true, nil // whole-body answer that really ends here
		}
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			err = fmt.Errorf("the body ended after %d of %d bytes", n, want)
		}
		return n, false, bodyError(ctx, err)
	}
	return n, eof, nil
}

// parseContentRange parses "bytes START-END/TOTAL" (TOTAL may be "*").
func parseContentRange(s string) (start, end, total int64, err error) {
	bad := fmt.Errorf("malformed Content-Range %q", s)
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, z, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	if end, err = strconv.ParseInt(z, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil {
			return 0, 0, 0, bad
		}
	}
	return start, end, total, nil
}

// BlobSize is the stored size of blob digest, from a HEAD request.
func (c *Client) BlobSize(ctx context.Context, digest string) (int64, error) {
	hc, err := c.httpClient(ctx)
	if err != nil {
		return 0, err
	}
	u := c.url("blobs", digest)
	var size int64
	r := c.retrier()
	for {
		size, err = c.head(ctx, hc, u)
		again, err := r.again(ctx, err)
		if !again {
			return size, err
		}
	}
}

func (c *Client) head(ctx context.Context, hc *http.Client, u string) (int64, error) {
	release, err := c.slot(ctx)
	if err != nil {
		return 0, err
	}
	defer release()
	resp, err := c.send(ctx, hc, http.MethodHead, u, nil)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, statusError(resp)
	}
	if resp.ContentLength < 0 {
		return 0, errors.New("the registry's HEAD answer has no Content-Length")
	}
	return resp.ContentLength, nil
}

// Blob opens blob digest for streaming. A body cut short or stalled is
// resumed with a Range request after the bytes already received; the
// stream has one retry budget (Options.Retries) for its whole life. It
// holds a request slot until closed. The caller checks size and digest.
func (c *Client) Blob(ctx context.Context, digest string) (io.ReadCloser, error) {
	hc, err := c.httpClient(ctx)
	if err != nil {
		return nil, err
	}
	release, err := c.slot(ctx)
	if err != nil {
		return nil, err
	}
	s := &blobStream{c: c, ctx: ctx, hc: hc, url: c.url("blobs", digest), r: c.retrier(), release: release}
	if err := s.open(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

type blobStream struct {
	c       *Client
	ctx     context.Context
	hc      *http.Client
	url     string
	r       *retrier
	off     int64         // bytes delivered
	body    io.ReadCloser // nil between requests
	err     error         // sticky
	once    sync.Once
	release func()
}

// open sends requests until one answers from s.off on, or the retries are
// spent.
func (s *blobStream) open() error {
	for {
		err := s.request()
		again, err := s.r.again(s.ctx, err)
		if !again {
			return err
		}
	}
}

func (s *blobStream) request() error {
	var h http.Header
	if s.off > 0 {
		h = http.Header{"Range": {fmt.Sprintf("bytes=%d-", s.off)}}
	}
	resp, err := s.c.send(s.ctx, s.hc, http.MethodGet, s.url, h)
	if err != nil {
		return err
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		if s.off > 0 { // Range ignored: skip what was delivered
			if _, err := io.CopyN(io.Discard, resp.Body, s.off); err != nil {
				resp.Body.Close()
				return bodyError(s.ctx, err)
			}
		}
	case resp.StatusCode == http.StatusPartialContent && s.off > 0:
		cr := resp.Header.Get("Content-Range")
		if start, _, _, err := parseContentRange(cr); err != nil || start != s.off {
			resp.Body.Close()
			return fmt.Errorf("asked for bytes from %d on, the registry sent Content-Range %q", s.off, cr)
		}
	default:
		err := statusError(resp)
		resp.Body.Close()
		return err
	}
	s.body = resp.Body
	return nil
}

func (s *blobStream) Read(p []byte) (int, error) {
	for {
		if s.err != nil {
			return 0, s.err
		}
		n, err := s.body.Read(p)
		s.off += int64(n)
		s.c.bytes.Add(int64(n))
		if err == nil || err == io.EOF {
			return n, err
		}
		s.body.Close()
		s.body = nil
		again, err := s.r.again(s.ctx, bodyError(s.ctx, err))
		if again {
			err = s.open()
		}
		s.err = err
		if n > 0 {
			return n, nil // a sticky error comes with the next Read
		}
		if err != nil {
			return 0, err
		}
	}
}

func (s *blobStream) Close() error {
	var err error
	s.once.Do(func() {
		if s.body != nil {
			err = s.body.Close()
		}
		if s.err == nil {
			s.err = errors.New("read of a closed blob stream")
		}
		s.release()
	})
	return err
}
