cdef class RequestHead:
    cdef public bytes method, target
    cdef public str version
    cdef public list headers
    cdef public object host, content_length, upgrade, request_id
    cdef public bint chunked, keep_alive, expect_continue
    cdef public tuple connection_tokens

cdef class ResponseHead:
    cdef public int status
    cdef public bytes reason
    cdef public str version
    cdef public list headers
    cdef public object content_length, upgrade
    cdef public bint chunked, keep_alive, close_delimited

cdef class _EndOfMessage:
    pass

cdef class Upgrade:
    cdef public bytes rest
