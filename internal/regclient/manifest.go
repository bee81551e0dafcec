package regclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
)

// Manifest fetches the manifest or index that id (a tag or a
// "sha256:<hex>" digest) names, at most limit bytes, with the media type
// the registry declared ("" when it did not). accept is the Accept header.
// A tag the repository does not have fails with the tags it does have.
// The caller checks the digest.
func (c *Client) Manifest(ctx context.Context, id, accept string, limit int64) (raw []byte, mediaType string, err error) {
	hc, err := c.httpClient(ctx)
	if err != nil {
		return nil, "", err
	}
	u := c.url("manifests", id)
	r := c.retrier()
	for {
		raw, mediaType, err = c.fetchSmall(ctx, hc, u, "manifest", accept, limit)
		again, gerr := r.again(ctx, err)
		if !again {
			err = gerr
			break
		}
	}
	if err != nil && errors.Is(err, ErrNotFound) && !strings.Contains(id, ":") {
		return nil, "", c.noSuchTag(ctx, err)
	}
	return raw, mediaType, err
}

// fetchSmall GETs a document that is read into memory.
// what ("manifest") prefixes the size errors.
func (c *Client) fetchSmall(ctx context.Context, hc *http.Client, u, what, accept string, limit int64) ([]byte, string, error) {
	release, err := c.slot(ctx)
	if err != nil {
		return nil, "", err
	}
	defer release()
	var h http.Header
	if accept != "" {
		h = http.Header{"Accept": {accept}}
	}
	resp, err := c.send(ctx, hc, http.MethodGet, u, h)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, "", statusError(resp)
	}
	if resp.ContentLength > limit {
		return nil, "", fmt.Errorf("%s: %d bytes exceed the %d-byte limit", what, resp.ContentLength, limit)
	}
	raw, err := ReadLimited(resp.Body, limit)
	if errors.Is(err, ErrTooLarge) {
		return nil, "", fmt.Errorf("%s: %w", what, err)
	} else if err != nil {
		return nil, "", bodyError(ctx, err)
	}
	mt, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
	return raw, strings.TrimSpace(mt), nil
}

// maxTagList caps the tag list read to explain a missing tag.
const maxTagList = 1 << 20

// Tags lists the repository's tags (the first page, if the registry
// paginates).
func (c *Client) Tags(ctx context.Context) ([]string, error) {
	hc, err := c.httpClient(ctx)
	if err != nil {
		return nil, err
	}
	var raw []byte
	r := c.retrier()
	for {
		raw, _, err = c.fetchSmall(ctx, hc, c.url("tags", "list"), "tag list", "", maxTagList)
		again, gerr := r.again(ctx, err)
		if !again {
			err = gerr
			break
		}
	}
	if err != nil {
		return nil, err
	}
	var list struct {
		Tags []string `json:"tags"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("tag list: %w", err)
	}
	return list.Tags, nil
}

// noSuchTag explains a 404 for a tag with the tags the repository has.
func (c *Client) noSuchTag(ctx context.Context, cause error) error {
	tags, err := c.Tags(ctx)
	if errors.Is(err, ErrNotFound) {
		return fmt.Errorf("no such repository: %w", err)
	}
	if err != nil {
		// Unknown repository, or no tag listing: say what the registry said.
		return fmt.Errorf("no such tag: %w", cause)
	}
	return &TagError{Tags: tags, cause: cause}
}

// TagError is a tag the repository does not have.
type TagError struct {
	Tags  []string // the tags it has
	cause error
}

// shownTags is how many tags a TagError lists.
const shownTags = 10

func (e *TagError) Error() string {
	if len(e.Tags) == 0 {
		return "no such tag (the repository has none)"
	}
	tags := slices.Sorted(slices.Values(e.Tags))
	more := ""
	if len(tags) > shownTags {
		more = fmt.Sprintf(" and %d more", len(tags)-shownTags)
		tags = tags[:shownTags]
	}
	for i, t := range tags {
		tags[i] = clip(t, 128)
	}
	return "no such tag (the repository has: " + strings.Join(tags, ", ") + more + ")"
}

func (e *TagError) Unwrap() error { return e.cause }
