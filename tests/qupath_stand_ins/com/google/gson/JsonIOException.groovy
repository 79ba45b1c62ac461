package com.google.gson

/** Gson's JsonIOException: what toJson throws on an object of the JDK it has no adapter for, whose fields Java 17+
 * keeps it from reading (ReflectionAccessFilterHelper; a Path, a File), Gson 2.10 (QuPath 0.4.4) to 2.13 (QuPath 0.7). */
class JsonIOException extends JsonParseException {
    JsonIOException(String message, Throwable cause = null) { super(message, cause) }
}
